/* One decode step's attention over a shared prefix and each row's own cached columns, fp32 on CPU: the kernel behind
   builder/cpu_attention.py (which says why it exists and how it is built). One pass per row and key/value head:
   scores of its G query heads against its live columns only, softmax with the prefix's scores, weighted values.
   AVX-512 where the compiler targets it (-march=native), plain C otherwise; every sum is in a fixed order, so a
   row's part here depends on its own inputs only, not on the batch around it or the width of the window. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__)
/* The sums of a, b, c, d's 16 lanes, as the 4 lanes of the result. */
static inline __m128 sum4(__m512 a, __m512 b, __m512 c, __m512 d) {
    __m256 a8 = _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
    __m256 b8 = _mm256_add_ps(_mm512_castps512_ps256(b), _mm512_extractf32x8_ps(b, 1));
    __m256 c8 = _mm256_add_ps(_mm512_castps512_ps256(c), _mm512_extractf32x8_ps(c, 1));
    __m256 d8 = _mm256_add_ps(_mm512_castps512_ps256(d), _mm512_extractf32x8_ps(d, 1));
    __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(a8, b8), _mm256_hadd_ps(c8, d8));
    return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

/* exp(x) for x <= 0 (Cephes' expf: x = n ln2 + r, a degree-5 polynomial in r, times 2^n), ~1 ulp. */
static inline __m512 exp_ps(__m512 x) {
    const __mmask16 normal = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.3f), _CMP_GE_OQ);  /* else 0 (and -inf) */
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_maskz_mov_ps(normal, _mm512_scalef_ps(p, n));
}
#endif

/* Scores of G query heads (rows of q, D apart) against one key: scaling * <q_g, key>. */
static inline void dot_g(const float *restrict q, const float *restrict key, int64_t G, int64_t D, float scaling,
                         float *restrict out, int64_t stride) {
    int64_t g = 0;
#if defined(__AVX512F__)
    if (D % 16 == 0) {
        for (; g + 4 <= G; g += 4) {
            const float *q0 = q + g * D;
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int64_t d = 0; d < D; d += 16) {
                __m512 kv = _mm512_loadu_ps(key + d);
                a0 = _mm512_fmadd_ps(_mm512_loadu_ps(q0 + d), kv, a0);
                a1 = _mm512_fmadd_ps(_mm512_loadu_ps(q0 + D + d), kv, a1);
                a2 = _mm512_fmadd_ps(_mm512_loadu_ps(q0 + 2 * D + d), kv, a2);
                a3 = _mm512_fmadd_ps(_mm512_loadu_ps(q0 + 3 * D + d), kv, a3);
            }
            float s[4];
            _mm_storeu_ps(s, _mm_mul_ps(sum4(a0, a1, a2, a3), _mm_set1_ps(scaling)));
            for (int i = 0; i < 4; i++) out[(g + i) * stride] = s[i];
        }
        for (; g < G; g++) {
            __m512 a = _mm512_setzero_ps();
            for (int64_t d = 0; d < D; d += 16)
                a = _mm512_fmadd_ps(_mm512_loadu_ps(q + g * D + d), _mm512_loadu_ps(key + d), a);
            out[g * stride] = _mm512_reduce_add_ps(a) * scaling;
        }
    }
#endif
    for (; g < G; g++) {
        float acc[8] = {0};
        int64_t d = 0;
        for (; d + 8 <= D; d += 8)
            for (int l = 0; l < 8; l++) acc[l] += q[g * D + d + l] * key[d + l];
        for (; d < D; d++) acc[d % 8] += q[g * D + d] * key[d];
        out[g * stride] = (((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]))) * scaling;
    }
}

/* x[i] = exp(x[i] - m), returning their sum. */
static inline float exp_sum(float *x, int64_t n, float m) {
    int64_t i = 0;
    float total = 0.0f;
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps(), mm = _mm512_set1_ps(m);
    for (; i + 16 <= n; i += 16) {
        __m512 e = exp_ps(_mm512_sub_ps(_mm512_loadu_ps(x + i), mm));
        _mm512_storeu_ps(x + i, e);
        acc = _mm512_add_ps(acc, e);
    }
    if (i < n) {
        __mmask16 k = (__mmask16)((1u << (n - i)) - 1);
        __m512 e = exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + i), mm));
        _mm512_mask_storeu_ps(x + i, k, e);
        acc = _mm512_add_ps(acc, _mm512_maskz_mov_ps(k, e));
        i = n;
    }
    total = _mm512_reduce_add_ps(acc);
#endif
    for (; i < n; i++) total += (x[i] = expf(x[i] - m));
    return total;
}

/* out[g, :] += sum over live columns c < W of w[g * ws + c] * v[c * vc + :], for G heads at once. */
static inline void weighted_values(const float *restrict w, int64_t ws, const float *restrict v, int64_t vc,
                                   const uint8_t *restrict live, int64_t W, int64_t G, int64_t D,
                                   float *restrict out) {
    int64_t g = 0;
#if defined(__AVX512F__)
    if (D % 16 == 0 && D <= 256) {
        for (; g + 4 <= G; g += 4) {
            for (int64_t d0 = 0; d0 < D; d0 += 64) {
                const int64_t n = (D - d0 < 64 ? D - d0 : 64) / 16;
                __m512 acc[4][4];
                for (int i = 0; i < 4; i++)
                    for (int j = 0; j < 4; j++) acc[i][j] = _mm512_setzero_ps();
                for (int64_t c = 0; c < W; c++) {
                    if (live && !live[c]) continue;
                    const float *row = v + c * vc + d0;
                    const __m512 x0 = _mm512_set1_ps(w[g * ws + c]), x1 = _mm512_set1_ps(w[(g + 1) * ws + c]);
                    const __m512 x2 = _mm512_set1_ps(w[(g + 2) * ws + c]), x3 = _mm512_set1_ps(w[(g + 3) * ws + c]);
                    for (int64_t j = 0; j < n; j++) {
                        __m512 r = _mm512_loadu_ps(row + 16 * j);
                        acc[0][j] = _mm512_fmadd_ps(x0, r, acc[0][j]);
                        acc[1][j] = _mm512_fmadd_ps(x1, r, acc[1][j]);
                        acc[2][j] = _mm512_fmadd_ps(x2, r, acc[2][j]);
                        acc[3][j] = _mm512_fmadd_ps(x3, r, acc[3][j]);
                    }
                }
                for (int i = 0; i < 4; i++)
                    for (int64_t j = 0; j < n; j++) {
                        float *o = out + (g + i) * D + d0 + 16 * j;
                        _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), acc[i][j]));
                    }
            }
        }
    }
#endif
    for (; g < G; g++)
        for (int64_t c = 0; c < W; c++) {
            if (live && !live[c]) continue;
            const float x = w[g * ws + c];
            for (int64_t d = 0; d < D; d++) out[g * D + d] += x * v[c * vc + d];
        }
}

/* For each row b and key/value head h, with the G query heads q[b, h] (grouped-query attention): the softmax of
   the scaled scores over the prefix's P columns (pk, pv: [H, P, D] with strides (pkh, pkc, 1), shared by every
   row) and the row's own columns c < W with mask[b, c], and out[b, h] = their weighted values.
   q, out: [B, H, G, D] contiguous; k, v: strides (kb, kh, kc, 1) and (vb, vh, vc, 1); mask: bytes [B, W] with
   strides (mb, mc), or NULL for every column. Returns 0, or -1 if the scratch could not be allocated. */
int decode_attention(const float *restrict q, const float *restrict k, const float *restrict v,
                     const uint8_t *restrict mask, const float *restrict pk, const float *restrict pv, int64_t B,
                     int64_t H, int64_t G, int64_t D, int64_t W, int64_t P, int64_t kb, int64_t kh, int64_t kc,
                     int64_t vb, int64_t vh, int64_t vc, int64_t mb, int64_t mc, int64_t pkh, int64_t pkc,
                     int64_t pvh, int64_t pvc, float scaling, float *restrict out) {
    const int64_t n = P + W;  /* columns of a score row: the prefix's, then the row's own */
    float *scores = malloc(sizeof(float) * (size_t)(G * n + 1));
    uint8_t *live = malloc((size_t)W + 1);
    if (!scores || !live) { free(scores); free(live); return -1; }
    for (int64_t b = 0; b < B; b++) {
        int64_t first = W;  /* the row's first live column */
        for (int64_t c = W - 1; c >= 0; c--) if ((live[c] = mask ? mask[b * mb + c * mc] != 0 : 1)) first = c;
        for (int64_t h = 0; h < H; h++) {
            const float *qh = q + (b * H + h) * G * D, *kh_ = k + b * kb + h * kh, *vh_ = v + b * vb + h * vh;
            float *oh = out + (b * H + h) * G * D;
            /* The next head's (or row's) keys and values are fetched while this one computes: each is a block of
               a few KB that the hardware prefetcher meets only when it starts. */
            const int64_t nb = h + 1 < H ? b : b + 1, nh = h + 1 < H ? h + 1 : 0;
            const char *next_k = (const char *)(k + nb * kb + nh * kh), *next_v = (const char *)(v + nb * vb + nh * vh);
            const uint8_t *next_mask = mask && nb < B ? mask + nb * mb : 0;
            const int more = nb < B;
            for (int64_t c = 0; c < P; c++) dot_g(qh, pk + h * pkh + c * pkc, G, D, scaling, scores + c, n);
            for (int64_t c = 0; c < W; c++) {
                if (more && (!next_mask || next_mask[c * mc])) for (int64_t line = 0; line < D * 4; line += 64) {
                    __builtin_prefetch(next_k + c * kc * 4 + line);
                    __builtin_prefetch(next_v + c * vc * 4 + line);
                }
                if (live[c]) dot_g(qh, kh_ + c * kc, G, D, scaling, scores + P + c, n);
                else for (int64_t g = 0; g < G; g++) scores[g * n + P + c] = -INFINITY;
            }
            for (int64_t g = 0; g < G; g++) {
                float *sg = scores + g * n, m = -INFINITY;
                for (int64_t c = 0; c < n; c++) m = sg[c] > m ? sg[c] : m;
                /* The own columns' sum starts at the row's first live one, so its order does not depend on where
                   the row sits in the window (masked columns add exp(-inf) = 0). */
                const float inv = 1.0f / (exp_sum(sg, P, m) + exp_sum(sg + P + first, W - first, m));
                for (int64_t c = 0; c < P; c++) sg[c] *= inv;
                for (int64_t c = P + first; c < n; c++) sg[c] *= inv;
                for (int64_t d = 0; d < D; d++) oh[g * D + d] = 0.0f;
            }
            weighted_values(scores, n, pv + h * pvh, pvc, 0, P, G, D, oh);
            weighted_values(scores + P + first, n, vh_ + first * vc, vc, live + first, W - first, G, D, oh);
        }
    }
    free(scores); free(live);
    return 0;
}
