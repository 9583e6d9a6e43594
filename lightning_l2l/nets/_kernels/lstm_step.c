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
#ifdef _OPENMP
#include <omp.h>
#endif

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
#define NV ((4 * H + 15) / 16 * 16 / VW) /* vectors of gate pre-activations: 4 H floats padded to a multiple
                                          * of 16 (the packed weights' row, whatever the vector width) */
#define KMAX (H + (NIN > H ? NIN : H))
#define KPAD ((KMAX + 15) / 16 * 16) /* a row of a layer's weights for the backward (a multiple of 16) */
#define SAVE (NIN + L * 5 * H)             /* floats the forward saves per coordinate for the backward */
#ifndef PF
#define PF 8 /* coordinates ahead whose memory the backward prefetches: the data of a truncation's earlier steps
              * are out of cache, and each coordinate reads or writes five separate rows (the saved gates, both
              * states, the gradients): 11.2 -> 7.6-8.4 ms for the backward of 15,910 coordinates on 1 thread,
              * 8.0 -> 4.2-5.9 ms on 2 (20 steps in a row, both cores free). The same in the forward gained nothing. */
#endif
#ifndef BLK
#define BLK 2 /* coordinates per block: 2 beat 1, 3 and 4 (256, 213, 225, 224 ms per 1M coordinates on an AVX-512 AMD EPYC core) */
#endif

typedef float vf __attribute__((vector_size(4 * VW), aligned(4 * VW)));
typedef int32_t vi __attribute__((vector_size(4 * VW), aligned(4 * VW)));

/* mask ? a : b, lane by lane (a comparison gives a lane -1 where true, 0 where false) */
static inline vf vselect(vi mask, vf a, vf b) { return (vf)((mask & (vi)a) | (~mask & (vi)b)); }

/* e^x, Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-7 polynomial; about 1 ulp. Inputs
 * are clamped to [-87.3, 88.4]: the result stays finite. */
static inline vf vexp(vf x) {
    const vf hi = (vf){} + 88.3762626647949f, lo = (vf){} - 87.3365478515625f;
#if VW == 16
    x = (vf)_mm512_max_ps(_mm512_min_ps((__m512)x, (__m512)hi), (__m512)lo);
#else
    x = vselect(x < hi, x, hi);
    x = vselect(x > lo, x, lo);
#endif
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

/* sigmoid(-x) = 1 / (1 + e^x): the packed weights are negated, so gates arrive as -z */
static inline vf vsigmoid_neg(vf x) { return vrecip(1.0f + vexp(x)); }

static inline vf vload(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void vstore(float *p, vf v) { memcpy(p, &v, sizeof v); }

/* B coordinates at once (their gates side by side: each weight vector loaded once for all B, and
 * their cells share the vectors of tanh(c)); idx: their indices. */
static inline __attribute__((always_inline)) void block(const int B, const int64_t *idx, const float *grad,
        const float *state_in, float *state_out, float *save, float *update, const float *w, const float *b,
        const float *act, const float *wo, float bo, float scale, float small, float big, float inv_p) {
    float in[B][KMAX] __attribute__((aligned(64)));
    float gate[B][NV * VW] __attribute__((aligned(64)));
    float cell[((B * H + VW - 1) / VW) * VW] __attribute__((aligned(64)));
    float th[((B * H + VW - 1) / VW) * VW] __attribute__((aligned(64)));
    const float *si[B];
    float *so[B];
    for (int q = 0; q < B; ++q) {
        float g = grad[idx[q]];
        if (!isfinite(g)) g = 0.0f;
#if NIN == 2
        float a = fabsf(g);
        if (a >= small) {
            in[q][0] = logf(a) * inv_p;
            in[q][1] = (g > 0.0f) - (g < 0.0f);
        } else {
            in[q][0] = -1.0f;
            in[q][1] = g * big;
        }
#else
        in[q][0] = g;
#endif
        si[q] = state_in + idx[q] * (int64_t)(L * 2 * H);
        so[q] = state_out + idx[q] * (int64_t)(L * 2 * H);
        if (save) memcpy(save + idx[q] * (int64_t)SAVE, in[q], NIN * sizeof(float));
    }
    for (int j = B * H; j < (int)(sizeof cell / sizeof *cell); ++j) cell[j] = 0.0f;
    const float *wl = w, *bl = b;
    int nin = NIN;
    for (int l = 0; l < L; ++l) {
        for (int q = 0; q < B; ++q) memcpy(in[q] + nin, si[q] + l * 2 * H, H * sizeof(float));
        const int k = nin + H;
        vf z[B][NV];
        for (int v = 0; v < NV; ++v) {
            vf bias = vload(bl + v * VW);
            for (int q = 0; q < B; ++q) z[q][v] = bias;
        }
        for (int j = 0; j < k; ++j) {
            const float *row = wl + j * NV * VW;
            for (int v = 0; v < NV; ++v) {
                vf wv = vload(row + v * VW);
                for (int q = 0; q < B; ++q) z[q][v] += wv * in[q][j];
            }
        }
        for (int v = 0; v < NV; ++v) {
            for (int q = 0; q < B; ++q) {
                vf y = vsigmoid_neg(z[q][v]);
                if ((v + 1) * VW > 3 * H) y = vload(act + v * VW) * y + vload(act + (NV + v) * VW); /* tanh lanes */
                vstore(gate[q] + v * VW, y);
            }
        }
        for (int q = 0; q < B; ++q) {
            const float *c = si[q] + l * 2 * H + H; /* read before so[q] is written: they may alias */
            for (int j = 0; j < H; ++j) cell[q * H + j] = gate[q][H + j] * c[j] + gate[q][j] * gate[q][3 * H + j];
        }
        for (int v = 0; v < (int)(sizeof cell / sizeof *cell) / VW; ++v)
            vstore(th + v * VW, 2.0f * vsigmoid_neg(-2.0f * vload(cell + v * VW)) - 1.0f);
        for (int q = 0; q < B; ++q) {
            if (save) { /* the activations the backward needs: i, f, o, g, tanh(c) */
                float *sv = save + idx[q] * (int64_t)SAVE + NIN + l * 5 * H;
                memcpy(sv, gate[q], 4 * H * sizeof(float));
                memcpy(sv + 4 * H, th + q * H, H * sizeof(float));
            }
            float *h = so[q] + l * 2 * H;
            for (int j = 0; j < H; ++j) {
                float hj = gate[q][2 * H + j] * th[q * H + j];
                in[q][j] = hj; /* the next layer's input */
                h[j] = hj;
            }
            memcpy(h + H, cell + q * H, H * sizeof(float));
        }
        wl += k * NV * VW;
        bl += NV * VW;
        nin = H;
    }
    for (int q = 0; q < B; ++q) {
        float u = bo;
        for (int j = 0; j < H; ++j) u += wo[j] * in[q][j];
        update[idx[q]] = u * scale;
    }
}

/* Args:
 *   n: coordinates; grad (n,); keep (n,) or NULL: a coordinate with keep[i] == 0 gets update 0 and
 *   keeps its state; state (n, L, 2, H), updated in place; update (n,), written.
 *   w: per layer l, (K_l, NV * VW) floats: the transposed [W_ifo; W_g] of the layer (rows: the
 *      layer's inputs then its hidden state, K_0 = NIN + H, K_l = 2 H), columns zero-padded, times
 *      -s: -1 for the sigmoid gates (i, f, o), -2 for the cell input g (tanh z = 2 sigmoid(2 z) - 1).
 *   b: per layer, NV * VW floats, the biases times -s. act: 2 x NV * VW floats (a, c): a gate's
 *      activation is a * sigmoid(s z) + c (a = 1, c = 0 for i, f, o; a = 2, c = -1 for g).
 *   wo (H,), bo, scale: the output layer and the output scale. p: the preprocessing constant.
 */
void l2l_lstm_step(int64_t n, const float *grad, const uint8_t *keep, float *state, float *update,
                   const float *w, const float *b, const float *act, const float *wo, float bo,
                   float scale, float p) {
    const float small = expf(-p), big = expf(p), inv_p = 1.0f / p;
    int64_t idx[BLK];
    int pending = 0;
    for (int64_t i = 0; i < n; ++i) {
        if (keep && !keep[i]) {
            update[i] = 0.0f;
            continue;
        }
        idx[pending++] = i;
        if (pending == BLK) {
            block(BLK, idx, grad, state, state, NULL, update, w, b, act, wo, bo, scale, small, big, inv_p);
            pending = 0;
        }
    }
    for (int q = 0; q < pending; ++q) /* the last few, one by one */
        block(1, idx + q, grad, state, state, NULL, update, w, b, act, wo, bo, scale, small, big, inv_p);
}

/* The differentiable forward: like l2l_lstm_step without keep, the new state written to state_out
 * (state_in unchanged), and per coordinate the SAVE floats the backward reads into save: the
 * preprocessed input, then per layer the gates i, f, o, g (activated) and tanh(c). */
void l2l_lstm_forward(int64_t n, const float *grad, const float *state_in, float *state_out, float *save,
                      float *update, const float *w, const float *b, const float *act, const float *wo,
                      float bo, float scale, float p) {
    const float small = expf(-p), big = expf(p), inv_p = 1.0f / p;
    int64_t idx[BLK];
    int64_t i = 0;
    for (; i + BLK <= n; i += BLK) {
        for (int q = 0; q < BLK; ++q) idx[q] = i + q;
        block(BLK, idx, grad, state_in, state_out, save, update, w, b, act, wo, bo, scale, small, big, inv_p);
    }
    for (; i < n; ++i) block(1, &i, grad, state_in, state_out, save, update, w, b, act, wo, bo, scale, small,
                             big, inv_p);
}

/* The backward of l2l_lstm_forward. gu (n,): the gradient of the update; gs (n, L, 2, H) or NULL: of the
 * new state. Writes gin (n, L, 2, H), the gradient of state_in, adds the output layer's gradients to gwo (H + 1:
 * its weights, then its bias) and the other weights' gradients to gw: per
 * layer (KROWS + 1, NV * VW) floats, row k the gradient of input k's column of [W_ifo; W_g] (inputs, then
 * h; rows past the layer's inputs stay 0), row KROWS the biases'. wt: per layer the (4 H, KPAD) weights
 * [W_ifo; W_g], rows zero-padded; wo (H,) and scale: the output layer.
 *
 * By tiles of TB coordinates: first each coordinate's gate gradients d (and the state's gradient), then the
 * tile's d^T [inputs, h] added to gw with the sums in registers (four input rows at a time). */
#define KROWS ((KMAX + 3) / 4 * 4)
#define TB 32
void l2l_lstm_backward(int64_t n, const float *save, const float *state_in, const float *state_out,
                       const float *gu, const float *gs, float *gin, float *gw, float *gwo, const float *wt,
                       const float *wo, float scale) {
    static __thread float dt[TB][L][NV * VW] __attribute__((aligned(64)));
    static __thread float inr[TB][KROWS] __attribute__((aligned(64)));
    float gh[H], g_in[KPAD] __attribute__((aligned(64)));
    double go[H + 1]; /* summed over every coordinate of the run: in double, as torch's sum would be accurate */
    memset(dt, 0, sizeof dt); /* the lanes past 4 H stay 0 */
    memset(go, 0, sizeof go);
    for (int64_t t0 = 0; t0 < n; t0 += TB) {
        const int m = n - t0 < TB ? (int)(n - t0) : TB;
        for (int q = 0; q < m; ++q) {
            const int64_t i = t0 + q;
            const float *sv = save + i * (int64_t)SAVE;
            const float *si = state_in + i * (int64_t)(L * 2 * H);
            const float *gsi = gs ? gs + i * (int64_t)(L * 2 * H) : NULL;
            float *gi = gin + i * (int64_t)(L * 2 * H);
            const float gui = gu[i] * scale;
            const float *hl = state_out + i * (int64_t)(L * 2 * H) + (L - 1) * 2 * H; /* the output layer's input */
            if (i + PF < n) { /* what a coordinate PF ahead reads: out of memory, not cache */
                const int64_t f = i + PF;
                for (int c = 0; c < SAVE * 4; c += 64) __builtin_prefetch((const char *)(save + f * (int64_t)SAVE) + c);
                for (int c = 0; c < L * 2 * H * 4; c += 64) {
                    __builtin_prefetch((const char *)(state_in + f * (int64_t)(L * 2 * H)) + c);
                    __builtin_prefetch((const char *)(state_out + f * (int64_t)(L * 2 * H)) + c);
                    if (gs) __builtin_prefetch((const char *)(gs + f * (int64_t)(L * 2 * H)) + c);
                    __builtin_prefetch((const char *)(gin + f * (int64_t)(L * 2 * H)) + c, 1);
                }
            }
            for (int j = 0; j < H; ++j) go[j] += gui * hl[j];
            go[H] += gui;
            for (int j = 0; j < H; ++j) gh[j] = gui * wo[j] + (gsi ? gsi[(L - 1) * 2 * H + j] : 0.0f);
            for (int l = L - 1; l >= 0; --l) {
                const float *ig = sv + NIN + l * 5 * H, *fg = ig + H, *og = ig + 2 * H, *gg = ig + 3 * H,
                            *tc = ig + 4 * H;
                const float *c_old = si + l * 2 * H + H;
                float *d = dt[q][l];
                for (int j = 0; j < H; ++j) {
                    float gc = (gsi ? gsi[l * 2 * H + H + j] : 0.0f) + gh[j] * og[j] * (1.0f - tc[j] * tc[j]);
                    d[j] = gc * gg[j] * ig[j] * (1.0f - ig[j]);
                    d[H + j] = gc * c_old[j] * fg[j] * (1.0f - fg[j]);
                    d[2 * H + j] = gh[j] * tc[j] * og[j] * (1.0f - og[j]);
                    d[3 * H + j] = gc * ig[j] * (1.0f - gg[j] * gg[j]);
                    gi[l * 2 * H + H + j] = gc * fg[j];
                }
                /* the inputs' gradients: W^T d */
                vf acc[KPAD / VW];
                for (int v = 0; v < KPAD / VW; ++v) acc[v] = (vf){};
                const float *wl = wt + l * (int64_t)(4 * H * KPAD);
                for (int r = 0; r < 4 * H; ++r) {
                    const float dr = d[r];
                    for (int v = 0; v < KPAD / VW; ++v) acc[v] += vload(wl + r * KPAD + v * VW) * dr;
                }
                for (int v = 0; v < KPAD / VW; ++v) vstore(g_in + v * VW, acc[v]);
                const int nin = l == 0 ? NIN : H;
                for (int j = 0; j < H; ++j) gi[l * 2 * H + j] = g_in[nin + j];
                if (l > 0)
                    for (int j = 0; j < H; ++j) gh[j] = g_in[j] + (gsi ? gsi[(l - 1) * 2 * H + j] : 0.0f);
            }
        }
        /* the weights' gradients of the tile */
        for (int l = 0; l < L; ++l) {
            const int nin = l == 0 ? NIN : H, k = nin + H, kend = (k + 3) / 4 * 4;
            for (int q = 0; q < m; ++q) {
                const int64_t i = t0 + q;
                const float *xin = l == 0 ? save + i * (int64_t)SAVE : state_out + i * (int64_t)(L * 2 * H) + (l - 1) * 2 * H;
                const float *hin = state_in + i * (int64_t)(L * 2 * H) + l * 2 * H;
                for (int j = 0; j < nin; ++j) inr[q][j] = xin[j];
                for (int j = 0; j < H; ++j) inr[q][nin + j] = hin[j];
                for (int j = k; j < KROWS; ++j) inr[q][j] = 0.0f;
            }
            float *g = gw + l * (int64_t)((KROWS + 1) * NV * VW);
            for (int k0 = 0; k0 < kend; k0 += 4) {
                vf acc[4][NV];
                for (int u = 0; u < 4; ++u)
                    for (int v = 0; v < NV; ++v) acc[u][v] = (vf){};
                for (int q = 0; q < m; ++q)
                    for (int v = 0; v < NV; ++v) {
                        const vf dv = vload(dt[q][l] + v * VW);
                        for (int u = 0; u < 4; ++u) acc[u][v] += dv * inr[q][k0 + u];
                    }
                for (int u = 0; u < 4; ++u)
                    for (int v = 0; v < NV; ++v) {
                        float *row = g + (k0 + u) * NV * VW + v * VW;
                        vstore(row, vload(row) + acc[u][v]);
                    }
            }
            vf bacc[NV];
            for (int v = 0; v < NV; ++v) bacc[v] = (vf){};
            for (int q = 0; q < m; ++q)
                for (int v = 0; v < NV; ++v) bacc[v] += vload(dt[q][l] + v * VW);
            float *brow = g + KROWS * NV * VW;
            for (int v = 0; v < NV; ++v) vstore(brow + v * VW, vload(brow + v * VW) + bacc[v]);
        }
    }
    for (int j = 0; j <= H; ++j) gwo[j] += (float)go[j];
}

/* Built with -fopenmp (where the process's OpenMP runtime is torch's libgomp, which the loader then shares):
 * the three kernels over `parts` contiguous runs of coordinates in one parallel region, on the same threads
 * as torch's own ops. Python threads instead would compete for the cores with torch's OpenMP threads, which
 * spin-wait after each op: two threads were no faster than one in meta-training (docs/implementation.md).
 * The runs and their order do not depend on the team: results are those of `parts` sequential calls. */
int l2l_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

#define RUN(t) const int64_t a = n * (t) / parts, z = n * ((t) + 1) / parts
#define ROW (L * 2 * H)

void l2l_lstm_step_mt(int parts, int64_t n, const float *grad, const uint8_t *keep, float *state, float *update,
                      const float *w, const float *b, const float *act, const float *wo, float bo, float scale,
                      float p) {
#ifdef _OPENMP
#pragma omp parallel for num_threads(parts) schedule(static)
#endif
    for (int t = 0; t < parts; ++t) {
        RUN(t);
        l2l_lstm_step(z - a, grad + a, keep ? keep + a : NULL, state + a * ROW, update + a, w, b, act, wo, bo, scale, p);
    }
}

void l2l_lstm_forward_mt(int parts, int64_t n, const float *grad, const float *state_in, float *state_out,
                         float *save, float *update, const float *w, const float *b, const float *act,
                         const float *wo, float bo, float scale, float p) {
#ifdef _OPENMP
#pragma omp parallel for num_threads(parts) schedule(static)
#endif
    for (int t = 0; t < parts; ++t) {
        RUN(t);
        l2l_lstm_forward(z - a, grad + a, state_in + a * ROW, state_out + a * ROW, save + a * SAVE, update + a, w,
                         b, act, wo, bo, scale, p);
    }
}

/* gw, gwo: `parts` zeroed slabs of the weights' gradients, one per run (summed by the caller). */
void l2l_lstm_backward_mt(int parts, int64_t n, const float *save, const float *state_in, const float *state_out,
                          const float *gu, const float *gs, float *gin, float *gw, float *gwo, const float *wt,
                          const float *wo, float scale) {
#ifdef _OPENMP
#pragma omp parallel for num_threads(parts) schedule(static)
#endif
    for (int t = 0; t < parts; ++t) {
        RUN(t);
        l2l_lstm_backward(z - a, save + a * SAVE, state_in + a * ROW, state_out + a * ROW, gu + a,
                          gs ? gs + a * ROW : NULL, gin + a * ROW, gw + t * (int64_t)(L * (KROWS + 1) * NV * VW),
                          gwo + t * (H + 1), wt, wo, scale);
    }
}
