/* Dispatch, combine and gate gradient for one element type: a template body, included by
 * ops_f32.c and ops_f64.c after they define
 *   REAL        the element type (float or double)
 *   FN(name)    name##_f32 or name##_f64
 *   and, where SSE2 exists, the vector macros VEC, VLEN, VSET1, VZERO, VLOADU, VMUL, VSTREAM.
 * Shapes and semantics are in pymoe.h. Each operation comes twice: a plain loop, the readable
 * spec, and a tuned version (OpenMP over output rows, non-temporal row stores) that the tests
 * hold to the same results, bit for bit for dispatch and combine. */

/* ------------------------------------------------------------------ row helpers */

/* dst[0..n) = scale * src[0..n), or 0 when src is NULL, or a copy when scale is NULL.
 * Rows that are written once and not read back soon go around the cache (non-temporal stores):
 * that saves the read-for-ownership of each destination line, which is a third of a copy's
 * traffic. Multiplying by the scale and storing is the same arithmetic as the NumPy reference. */
static void FN(store_row)(REAL *dst, const REAL *src, const REAL *scale, int64_t n) {
    int64_t d = 0;
#ifdef VEC
    while (d < n && ((uintptr_t)(dst + d) & 15u)) {  /* scalar head until dst is 16-byte aligned */
        dst[d] = src == NULL ? (REAL)0 : scale ? *scale * src[d] : src[d];
        d++;
    }
    if (src == NULL) {
        for (; d + VLEN <= n; d += VLEN) VSTREAM(dst + d, VZERO());
    } else if (scale == NULL) {
        for (; d + VLEN <= n; d += VLEN) VSTREAM(dst + d, VLOADU(src + d));
    } else {
        VEC w = VSET1(*scale);
        for (; d + VLEN <= n; d += VLEN) VSTREAM(dst + d, VMUL(w, VLOADU(src + d)));
    }
#endif
    for (; d < n; d++) dst[d] = src == NULL ? (REAL)0 : scale ? *scale * src[d] : src[d];
}

static inline void FN(store_fence)(void) {
#ifdef VEC
    _mm_sfence();  /* make this thread's non-temporal stores visible before the region ends */
#endif
}

/* ------------------------------------------------------------------ dispatch */

int FN(pymoe_dispatch_naive)(REAL *expert_in, const REAL *x, const REAL *weight,
                             const int64_t *slot_owner, int64_t T, int64_t K, int64_t E,
                             int64_t C, int64_t D) {
    moe_sizes s;
    int err = check_dispatch_args(&s, expert_in, x, slot_owner, T, K, E, C, D);
    if (err) return err;
    for (int64_t r = 0; r < s.EC; r++) {           /* r = e*C + c, one expert slot */
        int64_t o = slot_owner[r];                 /* o = t*K + j, or -1: empty slot */
        for (int64_t d = 0; d < D; d++)
            expert_in[r * D + d] = o < 0 ? (REAL)0
                : weight ? weight[o] * x[(o / K) * D + d] : x[(o / K) * D + d];
    }
    return PYMOE_OK;
}

int FN(pymoe_dispatch)(REAL *expert_in, const REAL *x, const REAL *weight,
                       const int64_t *slot_owner, int64_t T, int64_t K, int64_t E, int64_t C,
                       int64_t D) {
    moe_sizes s;
    int err = check_dispatch_args(&s, expert_in, x, slot_owner, T, K, E, C, D);
    if (err) return err;
    const int64_t EC = s.EC;
#pragma omp parallel num_threads(pymoe_get_max_threads())
    {
#pragma omp for schedule(static)
        for (int64_t r = 0; r < EC; r++) {         /* each slot row written by one thread */
            int64_t o = slot_owner[r];
            const REAL *src = o < 0 ? NULL : x + (o / K) * D;
            FN(store_row)(expert_in + r * D, src, (o >= 0 && weight) ? weight + o : NULL, D);
        }
        FN(store_fence)();
    }
    return PYMOE_OK;
}

/* ------------------------------------------------------------------ combine */

int FN(pymoe_combine_naive)(REAL *y, const REAL *expert_out, const REAL *weight,
                            const int64_t *expert_index, const int64_t *position,
                            int64_t T, int64_t K, int64_t E, int64_t C, int64_t D) {
    moe_sizes s;
    int err = check_pair_args(&s, y, OUT_TD, expert_out, expert_index, position, T, K, E, C, D);
    if (err) return err;
    for (int64_t i = 0; i < s.TD; i++) y[i] = 0;
    for (int64_t t = 0; t < T; t++) {
        for (int64_t j = 0; j < K; j++) {
            int64_t p = position[t * K + j];
            if (p < 0) continue;                   /* dropped: contributes nothing */
            const REAL *src = expert_out + (expert_index[t * K + j] * C + p) * D;
            for (int64_t d = 0; d < D; d++)
                y[t * D + d] += weight ? weight[t * K + j] * src[d] : src[d];
        }
    }
    return PYMOE_OK;
}

/* Columns per tile: the tile's accumulators stay in L1 while the K source rows stream past. */
#define COMBINE_TILE 512
/* Kept choices of one token handled in registers (more go through the L1 tile). */
#define COMBINE_DIRECT 8

/* y[t, :] = sum_i w[i] * src[i][:] for n <= COMBINE_DIRECT rows, one pass, streamed out.
 * Adds in the order i = 0..n-1 starting from 0, exactly like the reference. */
static void FN(combine_row_direct)(REAL *dst, const REAL *const *src, const REAL *w, int n,
                                   int64_t D) {
    int64_t d = 0;
#ifdef VEC
    while (d < D && ((uintptr_t)(dst + d) & 15u)) {
        REAL a = 0;
        for (int i = 0; i < n; i++) a += w[i] * src[i][d];
        dst[d++] = a;
    }
    VEC wv[COMBINE_DIRECT];
    for (int i = 0; i < n; i++) wv[i] = VSET1(w[i]);
    for (; d + VLEN <= D; d += VLEN) {
        VEC a = VZERO();
        for (int i = 0; i < n; i++) a = VADD(a, VMUL(wv[i], VLOADU(src[i] + d)));
        VSTREAM(dst + d, a);
    }
#endif
    for (; d < D; d++) {
        REAL a = 0;
        for (int i = 0; i < n; i++) a += w[i] * src[i][d];
        dst[d] = a;
    }
}

/* The same sum through an L1 tile, for tokens with more than COMBINE_DIRECT kept choices. */
static void FN(combine_row_tiled)(REAL *dst, const REAL *expert_out, const REAL *weight,
                                  const int64_t *index, const int64_t *pos, int64_t K,
                                  int64_t C, int64_t D) {
    REAL acc[COMBINE_TILE];
    for (int64_t d0 = 0; d0 < D; d0 += COMBINE_TILE) {
        int64_t n = D - d0 < COMBINE_TILE ? D - d0 : COMBINE_TILE;
        for (int64_t i = 0; i < n; i++) acc[i] = 0;
        for (int64_t j = 0; j < K; j++) {
            if (pos[j] < 0) continue;
            const REAL *src = expert_out + (index[j] * C + pos[j]) * D + d0;
            REAL w = weight ? weight[j] : (REAL)1;
            for (int64_t i = 0; i < n; i++) acc[i] += w * src[i];
        }
        FN(store_row)(dst + d0, acc, NULL, n);
    }
}

int FN(pymoe_combine)(REAL *y, const REAL *expert_out, const REAL *weight,
                      const int64_t *expert_index, const int64_t *position,
                      int64_t T, int64_t K, int64_t E, int64_t C, int64_t D) {
    moe_sizes s;
    int err = check_pair_args(&s, y, OUT_TD, expert_out, expert_index, position, T, K, E, C, D);
    if (err) return err;
#pragma omp parallel num_threads(pymoe_get_max_threads())
    {
#pragma omp for schedule(static)
        for (int64_t t = 0; t < T; t++) {          /* each token row written by one thread */
            const REAL *src[COMBINE_DIRECT];
            REAL w[COMBINE_DIRECT];
            int n = 0, fits = 1;
            for (int64_t j = 0; j < K && fits; j++) {  /* kept choices, in order j = 0..K-1 */
                int64_t p = position[t * K + j];
                if (p < 0) continue;
                if (n == COMBINE_DIRECT) { fits = 0; break; }
                src[n] = expert_out + (expert_index[t * K + j] * C + p) * D;
                w[n++] = weight ? weight[t * K + j] : (REAL)1;
            }
            if (fits) FN(combine_row_direct)(y + t * D, src, w, n, D);
            else FN(combine_row_tiled)(y + t * D, expert_out, weight ? weight + t * K : NULL,
                                       expert_index + t * K, position + t * K, K, C, D);
        }
        FN(store_fence)();
    }
    return PYMOE_OK;
}

/* ------------------------------------------------------------------ gate gradient */

int FN(pymoe_gate_grad_naive)(REAL *dgate, const REAL *dy, const REAL *expert_out,
                              const int64_t *expert_index, const int64_t *position,
                              int64_t T, int64_t K, int64_t E, int64_t C, int64_t D) {
    moe_sizes s;
    int err = check_pair_args(&s, dgate, OUT_TK, expert_out, expert_index, position, T, K, E, C,
                              D);
    if (err) return err;
    REQUIRE(dy, s.TD);
    for (int64_t t = 0; t < T; t++) {
        for (int64_t j = 0; j < K; j++) {
            int64_t p = position[t * K + j];
            REAL sum = 0;
            if (p >= 0) {
                const REAL *src = expert_out + (expert_index[t * K + j] * C + p) * D;
                for (int64_t d = 0; d < D; d++) sum += dy[t * D + d] * src[d];
            }
            dgate[t * K + j] = sum;
        }
    }
    return PYMOE_OK;
}

/* Dot product with 8 independent partial sums (the compiler turns them into vector lanes),
 * added up in a fixed tree: the result depends only on D, never on threads or alignment. */
static REAL FN(dot)(const REAL *a, const REAL *b, int64_t n) {
    REAL acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t d = 0;
    for (; d + 8 <= n; d += 8)
        for (int u = 0; u < 8; u++) acc[u] += a[d + u] * b[d + u];
    for (; d < n; d++) acc[d & 7] += a[d] * b[d];
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

int FN(pymoe_gate_grad)(REAL *dgate, const REAL *dy, const REAL *expert_out,
                        const int64_t *expert_index, const int64_t *position,
                        int64_t T, int64_t K, int64_t E, int64_t C, int64_t D) {
    moe_sizes s;
    int err = check_pair_args(&s, dgate, OUT_TK, expert_out, expert_index, position, T, K, E, C,
                              D);
    if (err) return err;
    REQUIRE(dy, s.TD);
#pragma omp parallel for schedule(static) num_threads(pymoe_get_max_threads())
    for (int64_t t = 0; t < T; t++) {
        for (int64_t j = 0; j < K; j++) {
            int64_t p = position[t * K + j];
            dgate[t * K + j] = p < 0 ? (REAL)0
                : FN(dot)(dy + t * D, expert_out + (expert_index[t * K + j] * C + p) * D, D);
        }
    }
    return PYMOE_OK;
}
