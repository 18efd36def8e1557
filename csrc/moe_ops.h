/* Dispatch, combine and gate gradient for one element type: a template body, included by
 * ops_f32.c and ops_f64.c after they define
 *   REAL        the element type (float or double)
 *   FN(name)    name##_f32 or name##_f64
 *   and, where SSE2 exists, the vector macros VEC, VLEN, VSET1, VZERO, VLOADU, VMUL, VADD, VSTREAM.
 * Shapes and semantics are in pymoe.h. Each operation comes twice: a plain loop, the readable
 * spec, and a tuned version (OpenMP over output rows, non-temporal row stores) that the tests
 * hold to the same results, bit for bit for dispatch and combine. */

/* ------------------------------------------------------------------ row stores */
/* Rows that are written once and not read back soon go around the cache (non-temporal stores):
 * that saves the read-for-ownership of each destination line, a third of a copy's traffic.
 * Stores start with scalars until dst is 16-byte aligned, then go a vector at a time. */

#ifdef VEC
/* How many leading elements of dst[0..n) come before its first 16-byte boundary. */
static inline int64_t FN(unaligned_head)(const REAL *dst, int64_t n) {
    int64_t d = 0;
    while (d < n && ((uintptr_t)(dst + d) & 15u)) d++;
    return d;
}
#endif

/* dst[0..n) = 0 */
static void FN(zero_row)(REAL *dst, int64_t n) {
    int64_t d = 0;
#ifdef VEC
    for (int64_t h = FN(unaligned_head)(dst, n); d < h; d++) dst[d] = 0;
    for (; d + VLEN <= n; d += VLEN) VSTREAM(dst + d, VZERO());
#endif
    for (; d < n; d++) dst[d] = 0;
}

/* dst[0..n) = src[0..n) */
static void FN(copy_row)(REAL *dst, const REAL *src, int64_t n) {
    int64_t d = 0;
#ifdef VEC
    for (int64_t h = FN(unaligned_head)(dst, n); d < h; d++) dst[d] = src[d];
    for (; d + VLEN <= n; d += VLEN) VSTREAM(dst + d, VLOADU(src + d));
#endif
    for (; d < n; d++) dst[d] = src[d];
}

/* dst[0..n) = w * src[0..n), the same product as the NumPy reference's. */
static void FN(scale_row)(REAL *dst, const REAL *src, REAL w, int64_t n) {
    int64_t d = 0;
#ifdef VEC
    for (int64_t h = FN(unaligned_head)(dst, n); d < h; d++) dst[d] = w * src[d];
    VEC wv = VSET1(w);
    for (; d + VLEN <= n; d += VLEN) VSTREAM(dst + d, VMUL(wv, VLOADU(src + d)));
#endif
    for (; d < n; d++) dst[d] = w * src[d];
}

static inline void FN(store_fence)(void) {
#ifdef VEC
    _mm_sfence();  /* make this thread's non-temporal stores visible before the region ends */
#endif
}

/* ------------------------------------------------------------------ dispatch */

int FN(pymoe_dispatch_naive)(REAL *expert_in, const REAL *x, const int64_t *slot_owner,
                             const REAL *weight, int64_t T, int64_t K, int64_t E,
                             int64_t C, int64_t D) {
    moe_sizes s;
    int err = check_dispatch_args(&s, expert_in, x, slot_owner, T, K, E, C, D);
    if (err) return err;
    for (int64_t r = 0; r < s.EC; r++) {           /* r = e*C + c, one expert slot */
        int64_t o = slot_owner[r];                 /* o = t*K + j, or -1: empty slot */
        REAL *dst = expert_in + r * D;
        if (o < 0) {
            for (int64_t d = 0; d < D; d++) dst[d] = 0;
            continue;
        }
        const REAL *src = x + (o / K) * D;
        for (int64_t d = 0; d < D; d++) dst[d] = weight ? weight[o] * src[d] : src[d];
    }
    return PYMOE_OK;
}

int FN(pymoe_dispatch)(REAL *expert_in, const REAL *x, const int64_t *slot_owner,
                       const REAL *weight, int64_t T, int64_t K, int64_t E, int64_t C,
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
            REAL *dst = expert_in + r * D;
            if (o < 0) FN(zero_row)(dst, D);
            else if (weight) FN(scale_row)(dst, x + (o / K) * D, weight[o], D);
            else FN(copy_row)(dst, x + (o / K) * D, D);
        }
        FN(store_fence)();
    }
    return PYMOE_OK;
}

/* ------------------------------------------------------------------ combine */

/* y[0..D) = sum over kept j = 0..K-1 of w_j * expert_out[index[j], pos[j], :], added in that
 * order from 0 (w_j = weight[j], or the row itself when weight is NULL), like the reference. */
static void FN(combine_row)(REAL *y, const REAL *expert_out, const REAL *weight,
                            const int64_t *index, const int64_t *pos, int64_t K, int64_t C,
                            int64_t D) {
    for (int64_t d = 0; d < D; d++) y[d] = 0;
    for (int64_t j = 0; j < K; j++) {
        if (pos[j] < 0) continue;                  /* dropped: contributes nothing */
        const REAL *src = expert_out + (index[j] * C + pos[j]) * D;
        for (int64_t d = 0; d < D; d++) y[d] += weight ? weight[j] * src[d] : src[d];
    }
}

/* Kept choices of one token summed in registers; a token with more takes combine_row. */
#define COMBINE_DIRECT 8

/* Token t's kept rows and weights in order j = 0..K-1 (weight 1 when weight is NULL); returns
 * how many there are, storing only the first COMBINE_DIRECT. */
static int64_t FN(kept_rows)(const REAL **src, REAL *w, const REAL *expert_out,
                             const REAL *weight, const int64_t *index, const int64_t *pos,
                             int64_t K, int64_t C, int64_t D) {
    int64_t n = 0;
    for (int64_t j = 0; j < K; j++) {
        if (pos[j] < 0) continue;
        if (n < COMBINE_DIRECT) {
            src[n] = expert_out + (index[j] * C + pos[j]) * D;
            w[n] = weight ? weight[j] : (REAL)1;
        }
        n++;
    }
    return n;
}

/* dst[0..D) = sum_i w[i] * src[i][:] for n <= COMBINE_DIRECT rows, one pass, streamed out.
 * Adds in the order i = 0..n-1 starting from 0, exactly like the reference. */
static void FN(combine_row_direct)(REAL *dst, const REAL *const *src, const REAL *w, int n,
                                   int64_t D) {
    int64_t d = 0;
#ifdef VEC
    for (int64_t h = FN(unaligned_head)(dst, D); d < h; d++) {
        REAL a = 0;
        for (int i = 0; i < n; i++) a += w[i] * src[i][d];
        dst[d] = a;
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

/* combine_row's result, tuned: up to COMBINE_DIRECT kept rows summed in registers in one
 * streamed pass; a token with more kept rows takes the plain combine_row. */
static void FN(combine_row_tuned)(REAL *y, const REAL *expert_out, const REAL *weight,
                                  const int64_t *index, const int64_t *pos, int64_t K, int64_t C,
                                  int64_t D) {
    const REAL *src[COMBINE_DIRECT];
    REAL w[COMBINE_DIRECT];
    int64_t n = FN(kept_rows)(src, w, expert_out, weight, index, pos, K, C, D);
    if (n <= COMBINE_DIRECT) FN(combine_row_direct)(y, src, w, (int)n, D);
    else FN(combine_row)(y, expert_out, weight, index, pos, K, C, D);
}

/* y[t, :] = row(token t) for every token; with OpenMP over tokens when `parallel` (each y row
 * is written by one thread). */
static int FN(combine_by)(void (*row)(REAL *, const REAL *, const REAL *, const int64_t *,
                                      const int64_t *, int64_t, int64_t, int64_t),
                          int parallel, REAL *y, const REAL *expert_out,
                          const int64_t *expert_index, const int64_t *position,
                          const REAL *weight, int64_t T, int64_t K, int64_t E, int64_t C,
                          int64_t D) {
    moe_sizes s;
    int err = check_pair_args(&s, y, D, expert_out, expert_index, position, T, K, E, C, D);
    if (err) return err;
#pragma omp parallel if (parallel) num_threads(pymoe_get_max_threads())
    {
#pragma omp for schedule(static)
        for (int64_t t = 0; t < T; t++)
            row(y + t * D, expert_out, weight ? weight + t * K : NULL, expert_index + t * K,
                position + t * K, K, C, D);
        FN(store_fence)();
    }
    return PYMOE_OK;
}

/* ------------------------------------------------------------------ gate gradient */

/* The plain dot product: d = 0..n-1 in order from 0. */
static REAL FN(dot_plain)(const REAL *a, const REAL *b, int64_t n) {
    REAL sum = 0;
    for (int64_t d = 0; d < n; d++) sum += a[d] * b[d];
    return sum;
}

/* Dot product with 8 independent partial sums (the compiler turns them into vector lanes),
 * added up in a fixed tree: the result depends only on D, never on threads or alignment. */
static REAL FN(dot_tree)(const REAL *a, const REAL *b, int64_t n) {
    REAL acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t d = 0;
    for (; d + 8 <= n; d += 8)
        for (int u = 0; u < 8; u++) acc[u] += a[d + u] * b[d + u];
    for (; d < n; d++) acc[d & 7] += a[d] * b[d];
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

/* dgate[t, j] = dot(dy[t, :], expert_out[e_tj, p_tj, :]) for kept pairs, 0 for dropped ones;
 * with OpenMP over tokens when `parallel` (each dgate row is written by one thread). */
static int FN(gate_grad_by)(REAL (*dot)(const REAL *, const REAL *, int64_t), int parallel,
                            REAL *dgate, const REAL *dy, const REAL *expert_out,
                            const int64_t *expert_index, const int64_t *position,
                            int64_t T, int64_t K, int64_t E, int64_t C, int64_t D) {
    moe_sizes s;
    int err = check_gate_grad_args(&s, dgate, dy, expert_out, expert_index, position, T, K, E, C,
                                   D);
    if (err) return err;
#pragma omp parallel for schedule(static) if (parallel) num_threads(pymoe_get_max_threads())
    for (int64_t t = 0; t < T; t++) {
        for (int64_t j = 0; j < K; j++) {
            int64_t p = position[t * K + j];
            dgate[t * K + j] = p < 0 ? (REAL)0
                : dot(dy + t * D, expert_out + (expert_index[t * K + j] * C + p) * D, D);
        }
    }
    return PYMOE_OK;
}

/* ------------------------------------------------------------------ exported pairs */
/* pymoe.h's combine and gate_grad, each as the plain loop on one thread (NAME_naive, the spec)
 * and the tuned version on OpenMP threads (NAME): both check and run through BY with their own
 * row function. PARAMS is the operation's parameter list as pymoe.h declares it (combine's weight
 * after the pairs, gate_grad's two REAL arrays before them), ARGS its names in that order. */
#define EXPORT_PAIR_OP(NAME, BY, ROW, PARALLEL, PARAMS, ARGS) \
    int FN(NAME) PARAMS { return FN(BY)(FN(ROW), PARALLEL, ARGS); }
#define PAIR_SIZES int64_t T, int64_t K, int64_t E, int64_t C, int64_t D
#define COMBINE_PARAMS (REAL *y, const REAL *expert_out, const int64_t *expert_index, \
                        const int64_t *position, const REAL *weight, PAIR_SIZES)
#define COMBINE_ARGS y, expert_out, expert_index, position, weight, T, K, E, C, D
#define GATE_GRAD_PARAMS (REAL *dgate, const REAL *dy, const REAL *expert_out, \
                          const int64_t *expert_index, const int64_t *position, PAIR_SIZES)
#define GATE_GRAD_ARGS dgate, dy, expert_out, expert_index, position, T, K, E, C, D
EXPORT_PAIR_OP(pymoe_combine_naive, combine_by, combine_row, 0, COMBINE_PARAMS, COMBINE_ARGS)
EXPORT_PAIR_OP(pymoe_combine, combine_by, combine_row_tuned, 1, COMBINE_PARAMS, COMBINE_ARGS)
EXPORT_PAIR_OP(pymoe_gate_grad_naive, gate_grad_by, dot_plain, 0, GATE_GRAD_PARAMS,
               GATE_GRAD_ARGS)
EXPORT_PAIR_OP(pymoe_gate_grad, gate_grad_by, dot_tree, 1, GATE_GRAD_PARAMS, GATE_GRAD_ARGS)
#undef EXPORT_PAIR_OP
#undef PAIR_SIZES
#undef COMBINE_PARAMS
#undef COMBINE_ARGS
#undef GATE_GRAD_PARAMS
#undef GATE_GRAD_ARGS
