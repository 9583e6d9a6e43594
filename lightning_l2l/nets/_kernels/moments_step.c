/* One frozen step of MomentMLP (lightning_l2l/nets/moments.py) for a run of coordinates, fused: the moments
 * updated in place, the bias-corrected features, the MLP, the bounded update. Built and loaded by
 * lightning_l2l/nets/_fused_moments.py; its updates equal MomentMLP.forward's to float32 rounding
 * (tests/test_fused_moments.py).
 *
 * VW coordinates at a time, one per vector lane: every feature, hidden unit and output is one vector, and the
 * MLP's weights are broadcast scalars, so the 700-odd FLOPs of a coordinate run as full-width FMAs and the
 * state is read and written once. Compile-time constants: NM (momenta), NR (second moments), HID (hidden
 * units), NL (hidden layers, >= 0), NA (alignments, default 0).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if !defined(NM) || !defined(NR) || !defined(HID) || !defined(NL)
#error "compile with -DNM=<momenta> -DNR=<second moments> -DHID=<hidden> -DNL=<hidden layers>"
#endif
#ifndef NA
#define NA 0
#endif

#if defined(__AVX512F__) || defined(__AVX__)
#include <immintrin.h>
#endif
#if defined(__AVX512F__)
#define VW 16
#elif defined(__AVX__) || defined(__ARM_FEATURE_SVE)
#define VW 8
#else
#define VW 4
#endif
#define NF (NM + 1 + (NR - 1) + NA) /* features */
#define NS (NM + NR + NA + 1)       /* state columns: momenta, second moments, alignments, step count */

typedef float vf __attribute__((vector_size(4 * VW), aligned(4 * VW)));
typedef int32_t vi __attribute__((vector_size(4 * VW), aligned(4 * VW)));

static inline vf vsel(vi mask, vf a, vf b) { return (vf)((mask & (vi)a) | (~mask & (vi)b)); }
static inline vf vmin(vf a, vf b) { return vsel(a < b, a, b); }
static inline vf vmax(vf a, vf b) { return vsel(a > b, a, b); }
static inline vf vclamp(vf x, float lo, float hi) { return vmin(vmax(x, (vf){} + lo), (vf){} + hi); }
static inline vf vload(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void vstore(float *p, vf v) { memcpy(p, &v, sizeof v); }

/* e^x, Cephes' expf (as in lstm_step.c): about 1 ulp; x clamped to [-87.3, 88.4] */
static inline vf vexp(vf x) {
    x = vclamp(x, -87.3365478515625f, 88.3762626647949f);
    vf fn = x * 1.44269504088896341f;
    fn = (fn + 12582912.0f) - 12582912.0f; /* round to nearest (no -ffast-math: this must not fold) */
    vf r = x - fn * 0.693359375f;
    r = r - fn * -2.12194440e-4f;
    vf p = (vf){} + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    vi n = __builtin_convertvector(fn, vi);
    vi bits = (n + 127) << 23;
    vf scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* log x for normal x > 0, Cephes' logf: about 1 ulp */
static inline vf vlog(vf x) {
    vi bits;
    memcpy(&bits, &x, sizeof bits);
    vi e = ((bits >> 23) & 0xff) - 126;
    bits = (bits & 0x807fffff) | 0x3f000000; /* the mantissa in [0.5, 1) */
    vf m;
    memcpy(&m, &bits, sizeof m);
    vi small = m < 0.707106781186547524f;
    vf ef = __builtin_convertvector(e, vf) - vsel(small, (vf){} + 1.0f, (vf){});
    m = vsel(small, m + m, m) - 1.0f;
    vf z = m * m;
    vf y = (vf){} + 7.0376836292e-2f;
    y = y * m - 1.1514610310e-1f;
    y = y * m + 1.1676998740e-1f;
    y = y * m - 1.2420140846e-1f;
    y = y * m + 1.4249322787e-1f;
    y = y * m - 1.6668057665e-1f;
    y = y * m + 2.0000714765e-1f;
    y = y * m - 2.4999993993e-1f;
    y = y * m + 3.3333331174e-1f;
    y = y * m * z;
    y = y + ef * -2.12194440e-4f;
    y = y - 0.5f * z;
    return m + y + ef * 0.693359375f;
}

/* e^x - 1, accurate where x is small (the bias correction 1 - beta^t at t = 1 with beta = 0.999 is 1e-3: as
 * 1 - e^x it would lose four digits): Taylor to x^8 / 8! for |x| < 0.5 (the rest below 1e-11 relative) */
static inline vf vexpm1(vf x) {
    vf p = (vf){} + 1.0f / 40320.0f;
    p = p * x + 1.0f / 5040.0f;
    p = p * x + 1.0f / 720.0f;
    p = p * x + 1.0f / 120.0f;
    p = p * x + 1.0f / 24.0f;
    p = p * x + 1.0f / 6.0f;
    p = p * x + 0.5f;
    p = p * x * x + x;
    return vsel((x < 0.5f) & (x > -0.5f), p, vexp(x) - 1.0f);
}

static inline vf vtanh(vf x) { return 2.0f / (1.0f + vexp(-2.0f * x)) - 1.0f; }

static inline vf vsqrt(vf x) {
#if VW == 16 && defined(__AVX512F__)
    return (vf)_mm512_sqrt_ps((__m512)x);
#elif VW == 8 && defined(__AVX__)
    return (vf)_mm256_sqrt_ps((__m256)x);
#else
    vf out;
    for (int l = 0; l < VW; ++l) out[l] = sqrtf(x[l]);
    return out;
#endif
}

/* Args:
 *   n: coordinates; grad (n,); keep (n,) or NULL: a coordinate with keep[i] == 0 gets update 0 and keeps its
 *   state; state (n, NS) [momenta, second moments, alignments, t], updated in place; update (n,), written.
 *   beta: the NM + NR + NA decay rates (float32, as the eager rule rounds them), logb: their logs.
 *   w: per hidden layer its (HID, inputs) weights then (HID,) bias; then the head's (2, HID or NF) and (2,).
 *   adam: the index of the 0.9 momentum; limit: the gradient's clamp; lr, log_range, clip, eps, dscale:
 *   MomentMLP's; decay_steps, decay_power: its schedule (decay_steps <= 0: none). */
static void block(int m, const float *grad, const uint8_t *keep, float *state, float *update, const float *beta,
                  const float *logb, const float *w, int adam, float limit, float lr, float log_range, float clip,
                  float eps, float dscale, float decay_steps, float decay_power) {
    float st[NS][VW] __attribute__((aligned(64)));
    float gb[VW] __attribute__((aligned(64)));
    for (int l = 0; l < VW; ++l) {
        float g = l < m ? grad[l] : 0.0f;
        gb[l] = isfinite(g) ? g : 0.0f;
        for (int c = 0; c < NS; ++c) st[c][l] = l < m ? state[(int64_t)l * NS + c] : 0.0f;
    }
    vf g = vclamp(vload(gb), -limit, limit);
    vf t = vload(st[NS - 1]) + 1.0f;
    vf mom[NM], mhat[NM], v[NR], vhat[NR];
    for (int k = 0; k < NM; ++k) {
        mom[k] = beta[k] * vload(st[k]) + (1.0f - beta[k]) * g;
        mhat[k] = mom[k] / -vexpm1(t * logb[k]); /* 1 - beta^t */
    }
    for (int j = 0; j < NR; ++j) {
        v[j] = beta[NM + j] * vload(st[NM + j]) + (1.0f - beta[NM + j]) * g * g;
        vhat[j] = v[j] / -vexpm1(t * logb[NM + j]);
    }
    const vf r = 1.0f / (vsqrt(vhat[NR - 1]) + eps);
    vf x[NF];
    for (int k = 0; k < NM; ++k) x[k] = vclamp(mhat[k] * r, -10.0f, 10.0f);
    x[NM] = vclamp(g * r, -10.0f, 10.0f);
    const float eps2 = eps * eps;
    for (int j = 0; j < NR - 1; ++j) {
        vf ratio = (vhat[j] + eps2) / (vhat[NR - 1] + eps2);
        vf lg = 0.5f * vlog(vclamp(ratio, 1e-30f, 1e30f)); /* past the clamp of +-10 either way */
        x[NM + 1 + j] = vclamp(lg, -10.0f, 10.0f);
    }
    /* alignments: running means of (g r)(m_prev r), m_prev the bias-corrected 0.9 momentum before this gradient */
    vf al[NA > 0 ? NA : 1];
    if (NA > 0) {
        const vf prev = vmax(-vexpm1((t - 1.0f) * logb[adam]), (vf){} + 1e-12f); /* 1 - beta^(t-1), 0 at t = 1 */
        const vf prod = vclamp(g * r, -10.0f, 10.0f) * vclamp(vload(st[adam]) / prev * r, -10.0f, 10.0f);
        for (int k = 0; k < NA; ++k) {
            const float b = beta[NM + NR + k];
            al[k] = b * vload(st[NM + NR + k]) + (1.0f - b) * prod;
            x[NM + NR + k] = vclamp(al[k] / -vexpm1(t * logb[NM + NR + k]), -10.0f, 10.0f);
        }
    }
    /* the MLP: unit u of a layer = relu(b_u + sum_i W_ui in_i), coordinates in the lanes */
    vf hbuf[2][HID > NF ? HID : NF];
    const vf *in = x;
    int nin = NF;
    const float *wl = w;
    for (int layer = 0; layer < NL; ++layer) {
        vf *out = hbuf[layer & 1];
        const float *bl = wl + HID * nin;
        for (int u = 0; u < HID; ++u) {
            vf acc = (vf){} + bl[u];
            for (int i = 0; i < nin; ++i) acc += wl[u * nin + i] * in[i];
            out[u] = vmax(acc, (vf){});
        }
        wl = bl + HID;
        in = out;
        nin = HID;
    }
    vf o[2];
    for (int u = 0; u < 2; ++u) {
        vf acc = (vf){} + wl[2 * nin + u];
        for (int i = 0; i < nin; ++i) acc += wl[u * nin + i] * in[i];
        o[u] = acc;
    }
    vf direction = vclamp(mhat[adam] * r + dscale * vtanh(o[0]), -clip, clip);
    vf step = lr * vexp(log_range * vtanh(o[1]));
    if (decay_steps > 0.0f && decay_power > 0.0f) /* (1 + (t - 1) / decay_steps)^-power */
        step = step * vexp(-decay_power * vlog(1.0f + (t - 1.0f) / decay_steps));
    vf u = -step * direction;
    for (int k = 0; k < NM; ++k) vstore(st[k], mom[k]);
    for (int j = 0; j < NR; ++j) vstore(st[NM + j], v[j]);
    for (int k = 0; k < NA; ++k) vstore(st[NM + NR + k], al[k]);
    vstore(st[NS - 1], t);
    float ub[VW] __attribute__((aligned(64)));
    vstore(ub, u);
    for (int l = 0; l < m; ++l) {
        if (keep && !keep[l]) {
            update[l] = 0.0f;
            continue;
        }
        update[l] = ub[l];
        for (int c = 0; c < NS; ++c) state[(int64_t)l * NS + c] = st[c][l];
    }
}

void l2l_moments_step(int64_t n, const float *grad, const uint8_t *keep, float *state, float *update,
                      const float *beta, const float *logb, const float *w, int adam, float limit, float lr,
                      float log_range, float clip, float eps, float dscale, float decay_steps, float decay_power) {
    for (int64_t i = 0; i < n; i += VW) {
        const int m = n - i < VW ? (int)(n - i) : VW;
        block(m, grad + i, keep ? keep + i : NULL, state + i * NS, update + i, beta, logb, w, adam, limit, lr,
              log_range, clip, eps, dscale, decay_steps, decay_power);
    }
}

int l2l_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* over `parts` contiguous runs in one OpenMP parallel region (see lstm_step.c) */
void l2l_moments_step_mt(int parts, int64_t n, const float *grad, const uint8_t *keep, float *state,
                         float *update, const float *beta, const float *logb, const float *w, int adam, float limit,
                         float lr, float log_range, float clip, float eps, float dscale, float decay_steps,
                         float decay_power) {
#ifdef _OPENMP
#pragma omp parallel for num_threads(parts) schedule(static)
#endif
    for (int t = 0; t < parts; ++t) {
        const int64_t a = n * t / parts, z = n * (t + 1) / parts;
        l2l_moments_step(z - a, grad + a, keep ? keep + a : NULL, state + a * NS, update + a, beta, logb, w, adam,
                         limit, lr, log_range, clip, eps, dscale, decay_steps, decay_power);
    }
}
