/* One frozen step of CoordinatewiseLSTM for a run of coordinates, fused: preprocessing, every
 * layer's gates (input and hidden projections in one pass), the cell, the output layer, and the
 * state written back in place. Built and loaded by lightning_l2l/nets/_fused.py; its updates
 * equal the eager network's (lightning_l2l/nets/lstm.py) to float32 rounding (tests/test_fused.py).
 *
 * One coordinate at a time: its gate pre-activations, 4 * H floats (H = 20: five 16-float
 * vectors), stay in registers, and its state is read and written once where it lives, so the
 * step streams the state through the cache once and allocates nothing. Compile-time constants:
 * H (hidden units), L (layers), NIN (input features: 2 for log_sign, 1 for none).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#if !defined(H) || !defined(L) || !defined(NIN)
#error "compile with -DH=<hidden> -DL=<layers> -DNIN=<input features>"
#endif

/* floats per vector: the widest the target has (the vector type must not be wider: GCC would
 * emulate it through memory) */
#if defined(__AVX512F__)
#include <immintrin.h>
#define VW 16
#elif defined(__AVX__) || defined(__ARM_FEATURE_SVE)
#define VW 8
#else
#define VW 4
#endif
#define NV ((4 * H + VW - 1) / VW)  /* vectors of gate pre-activations */
#define NH ((H + VW - 1) / VW)      /* vectors of one gate */
#define KMAX (H + (NIN > H ? NIN : H))

typedef float vf __attribute__((vector_size(4 * VW), aligned(4 * VW)));
typedef int32_t vi __attribute__((vector_size(4 * VW), aligned(4 * VW)));

/* mask ? a : b, lane by lane (a comparison gives a lane -1 where true, 0 where false) */
static inline vf vselect(vi mask, vf a, vf b) { return (vf)((mask & (vi)a) | (~mask & (vi)b)); }

/* e^x, Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-7 polynomial; about 1 ulp. Inputs
 * are clamped to [-87.3, 88.4]: the result stays finite. */
static inline vf vexp(vf x) {
    const vf hi = (vf){} + 88.3762626647949f, lo = (vf){} - 87.3365478515625f;
    x = vselect(x < hi, x, hi);
    x = vselect(x > lo, x, lo);
#if VW == 16
    vf fn = (vf)_mm512_roundscale_ps((__m512)(x * 1.44269504088896341f), _MM_FROUND_TO_NEAREST_INT);
#else
    vf fn = x * 1.44269504088896341f;
    fn = (fn + 12582912.0f) - 12582912.0f; /* round to nearest (no -ffast-math: this must not fold) */
#endif
    vf r = x - fn * 0.693359375f;
    r = r - fn * -2.12194440e-4f;
    vf p = (vf){} + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
#if VW == 16
    return (vf)_mm512_scalef_ps((__m512)p, (__m512)fn); /* p * 2^n */
#else
    vi n = __builtin_convertvector(fn, vi);
    vi bits = (n + 127) << 23;
    vf scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
#endif
}

#if VW == 16
/* 1 / x: the 14-bit estimate and one Newton step (2 ulp); a division costs several times more. */
static inline vf vrecip(vf x) {
    vf r = (vf)_mm512_rcp14_ps((__m512)x);
    return r * (2.0f - x * r);
}
#else
static inline vf vrecip(vf x) { return 1.0f / x; }
#endif

static inline vf vsigmoid(vf x) { return vrecip(1.0f + vexp(-x)); }

static inline vf vload(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void vstore(float *p, vf v) { memcpy(p, &v, sizeof v); }

/* Args:
 *   n: coordinates; grad (n,); keep (n,) or NULL: a coordinate with keep[i] == 0 gets update 0 and
 *   keeps its state; state (n, L, 2, H), updated in place; update (n,), written.
 *   w: per layer l, (K_l, NV * VW) floats: the transposed [W_ifo; W_g] of the layer (rows: the
 *      layer's inputs then its hidden state, K_0 = NIN + H, K_l = 2 H), columns zero-padded.
 *   b: per layer, NV * VW floats. act: 3 x NV * VW floats (s, a, c): a gate's activation is
 *      a * sigmoid(s * z) + c (sigmoid for i, f, o; tanh = 2 sigmoid(2 z) - 1 for the cell input).
 *   wo (H,), bo, scale: the output layer and the output scale. p: the preprocessing constant.
 */
void l2l_lstm_step(int64_t n, const float *grad, const uint8_t *keep, float *state, float *update,
                   const float *w, const float *b, const float *act, const float *wo, float bo,
                   float scale, float p) {
    const float small = expf(-p), big = expf(p), inv_p = 1.0f / p;
    float in[KMAX] __attribute__((aligned(64)));
    float gate[NV * VW] __attribute__((aligned(64)));
    float cell[NH * VW] __attribute__((aligned(64)));
    float hid[NH * VW] __attribute__((aligned(64)));
    memset(cell, 0, sizeof cell);
    for (int64_t i = 0; i < n; ++i) {
        if (keep && !keep[i]) {
            update[i] = 0.0f;
            continue;
        }
        float g = grad[i];
        if (!isfinite(g)) g = 0.0f;
        int k0;
#if NIN == 2
        float a = fabsf(g);
        if (a >= small) {
            in[0] = logf(a) * inv_p;
            in[1] = (g > 0.0f) - (g < 0.0f);
        } else {
            in[0] = -1.0f;
            in[1] = g * big;
        }
        k0 = 2;
#else
        in[0] = g;
        k0 = 1;
#endif
        float *st = state + i * (int64_t)(L * 2 * H);
        const float *wl = w, *bl = b;
        int nin = k0;
        for (int l = 0; l < L; ++l) {
            float *h = st + l * 2 * H, *c = h + H;
            memcpy(in + nin, h, H * sizeof(float));
            int k = nin + H;
            vf z[NV];
            for (int v = 0; v < NV; ++v) z[v] = vload(bl + v * VW);
            for (int j = 0; j < k; ++j) {
                const float x = in[j];
                const float *row = wl + j * NV * VW;
                for (int v = 0; v < NV; ++v) z[v] += vload(row + v * VW) * x;
            }
            for (int v = 0; v < NV; ++v) {
                vf s = vload(act + v * VW), m = vload(act + (NV + v) * VW), o = vload(act + (2 * NV + v) * VW);
                vstore(gate + v * VW, m * vsigmoid(s * z[v]) + o);
            }
            for (int j = 0; j < H; ++j) cell[j] = gate[H + j] * c[j] + gate[j] * gate[3 * H + j];
            for (int v = 0; v < NH; ++v) {
                vf cv = vload(cell + v * VW);
                vstore(hid + v * VW, 2.0f * vsigmoid(2.0f * cv) - 1.0f);
            }
            for (int j = 0; j < H; ++j) {
                hid[j] *= gate[2 * H + j];
                in[j] = hid[j];
            }
            memcpy(h, hid, H * sizeof(float));
            memcpy(c, cell, H * sizeof(float));
            wl += k * NV * VW;
            bl += NV * VW;
            nin = H;
        }
        float u = bo;
        for (int j = 0; j < H; ++j) u += wo[j] * hid[j];
        update[i] = u * scale;
    }
}
