/* Top-K selection for one element type: a template body, included by ops_f32.c and ops_f64.c
 * after they define REAL and FN(name) (see moe_ops.h). Shapes and semantics are in pymoe.h. */

/* One token's top-K in three short passes, all but the last branch-free over the row:
 *  1. v = score + bias into scratch; a threshold th <= the K-th best value: split the E experts
 *     into G >= K groups and take the K-th largest group maximum (the K largest maxima are K
 *     distinct experts >= th). Groups are strided, expert e in group e % G with G = 2K rounded up
 *     to a vector, so their maxima come from plain vector max over the row, and about 1.3 K
 *     experts pass on normal logits (K contiguous groups, the fallback for E < 2G, pass 2.6 K).
 *  2. Candidates: the experts with v >= th, in expert order.
 *  3. Order the candidates by (v descending, expert ascending) and keep the first K: by counting
 *     each candidate's rank when there are few, else by a stable merge sort.
 * Every expert that can be among the K best is a candidate, so the result is the exact top-K with
 * ties to the lower index, the same integers as NumPy's stable argsort. */
#define TOPK_RANK_MAX 64  /* up to this many candidates, rank by all-pairs counting (no branches) */

/* Stable bottom-up merge sort of n (value, expert) pairs by decreasing value; ties keep order.
 * key/ix hold the input, key2/ix2 are scratch; returns whichever pair of arrays holds the result. */
static int64_t *FN(topk_merge_sort)(REAL *key, int64_t *ix, REAL *key2, int64_t *ix2, int64_t n) {
    for (int64_t w = 1; w < n; w *= 2) {
        for (int64_t lo = 0; lo < n; lo += 2 * w) {
            int64_t mid = lo + w < n ? lo + w : n, hi = lo + 2 * w < n ? lo + 2 * w : n;
            int64_t a = lo, b = mid, o = lo;
            while (a < mid && b < hi) {
                int right = key[b] > key[a];       /* strictly: ties take the left (lower) one */
                key2[o] = right ? key[b] : key[a];
                ix2[o++] = right ? ix[b++] : ix[a++];
            }
            while (a < mid) { key2[o] = key[a]; ix2[o++] = ix[a++]; }
            while (b < hi) { key2[o] = key[b]; ix2[o++] = ix[b++]; }
        }
        REAL *tk = key; key = key2; key2 = tk;
        int64_t *ti = ix; ix = ix2; ix2 = ti;
    }
    return ix;
}

/* The largest of v[0..n), n >= 1; *nan |= whether any is NaN. Four running maxima, not one: a
 * single chain waits out VMAX's latency at every step (max is exact, so any grouping agrees). */
static REAL FN(row_max)(const REAL *v, int64_t n, int *nan) {
    REAL m = v[0];
    int64_t e = 0;
#ifdef VEC
    if (n >= VLEN) {
        VEC m0 = VLOADU(v), m1 = m0, m2 = m0, m3 = m0, bad = VCMPUNORD(m0, m0);
        for (e = VLEN; e + 4 * VLEN <= n; e += 4 * VLEN) {
            VEC x0 = VLOADU(v + e), x1 = VLOADU(v + e + VLEN);
            VEC x2 = VLOADU(v + e + 2 * VLEN), x3 = VLOADU(v + e + 3 * VLEN);
            m0 = VMAX(m0, x0); m1 = VMAX(m1, x1); m2 = VMAX(m2, x2); m3 = VMAX(m3, x3);
            bad = VOR(bad, VOR(VOR(VCMPUNORD(x0, x0), VCMPUNORD(x1, x1)),
                               VOR(VCMPUNORD(x2, x2), VCMPUNORD(x3, x3))));
        }
        for (; e + VLEN <= n; e += VLEN) {
            VEC x = VLOADU(v + e);
            m0 = VMAX(m0, x);
            bad = VOR(bad, VCMPUNORD(x, x));
        }
        m0 = VMAX(VMAX(m0, m1), VMAX(m2, m3));
        REAL lanes[VLEN];
        memcpy(lanes, &m0, sizeof(lanes));
        m = lanes[0];
        for (int u = 1; u < VLEN; u++) m = lanes[u] > m ? lanes[u] : m;
        *nan |= VMOVEMASK(bad) != 0;
    }
#endif
    for (; e < n; e++) {
        m = v[e] > m ? v[e] : m;
        *nan |= v[e] != v[e];
    }
    return m;
}

#ifdef VEC
/* Set bits of a VLEN-bit compare mask (a table: no popcnt instruction in baseline x86-64). */
static const int FN(popcount)[16] = {0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4};
#endif

/* rank of v[i] among v[0..n) by (value descending, index ascending): #{j: v_j > v_i} +
 * #{j < i: v_j == v_i}, a permutation of 0..n-1. v[n..np) is -inf padding to a whole vector. */
static int64_t FN(rank_of)(const REAL *v, int64_t i, int64_t n, int64_t np) {
    int64_t r = 0, j = 0;
    REAL vi = v[i];
#ifdef VEC
    VEC b = VSET1(vi);
    for (; j + VLEN <= i; j += VLEN)               /* j < i: greater or equal counts */
        r += FN(popcount)[VMOVEMASK(VCMPGE(VLOADU(v + j), b))];
    for (; j < i; j++) r += v[j] >= vi;
    for (; j % VLEN && j < np; j++) r += v[j] > vi;
    for (; j + VLEN <= np; j += VLEN)              /* j >= i: strictly greater counts */
        r += FN(popcount)[VMOVEMASK(VCMPGT(VLOADU(v + j), b))];
#else
    (void)np;
#endif
    for (; j < i; j++) r += v[j] >= vi;
    for (; j < n; j++) r += v[j] > vi;
    return r;
}

/* Pass 1's threshold (see the top): a value <= the K-th largest of v[0..E). gmax: G REALs of
 * scratch. *nan |= whether any v is NaN. */
static REAL FN(topk_threshold)(const REAL *v, int64_t K, int64_t E, REAL *gmax, int *nan) {
#ifdef VEC
    const int64_t G = (2 * K + VLEN - 1) / VLEN * VLEN;
#else
    const int64_t G = 2 * K;
#endif
    if (E < 2 * G) {                               /* few experts: K contiguous groups */
        REAL th = 0;
        for (int64_t g = 0; g < K; g++) {          /* group g: experts [g*E/K, (g+1)*E/K) */
            int64_t lo = g * E / K, hi = (g + 1) * E / K;
            REAL m = FN(row_max)(v + lo, hi - lo, nan);
            th = (g == 0 || m < th) ? m : th;
        }
        return th;
    }
    const int64_t R = E / G;                       /* whole rows of G experts (R >= 2) */
    int64_t i = 0;
    int bad = 0;
#ifdef VEC
    for (; i < G; i += VLEN) {                     /* a vector of groups at a time, down the rows */
        VEC m = VLOADU(v + i), un = VCMPUNORD(m, m);
        for (int64_t row = 1; row < R; row++) {
            VEC x = VLOADU(v + row * G + i);
            m = VMAX(m, x);
            un = VOR(un, VCMPUNORD(x, x));
        }
        memcpy(gmax + i, &m, sizeof(m));
        bad |= VMOVEMASK(un) != 0;
    }
#endif
    for (; i < G; i++) {                           /* without vectors: one group at a time */
        REAL m = v[i];
        bad |= m != m;
        for (int64_t row = 1; row < R; row++) {
            REAL x = v[row * G + i];
            m = x > m ? x : m;
            bad |= x != x;
        }
        gmax[i] = m;
    }
    for (i = 0; R * G + i < E; i++) {              /* the last, partial row */
        REAL x = v[R * G + i];
        gmax[i] = x > gmax[i] ? x : gmax[i];
        bad |= x != x;
    }
    *nan |= bad;
    for (i = 0; i < G - 1; i++)                    /* the maximum ranked K-1 */
        if (FN(rank_of)(gmax, i, G, G) == K - 1) break;
    return gmax[i];
}

/* scratch: 2*E REALs and 2*E int64 (+ VLEN REALs of padding). Returns nonzero when a v is NaN
 * (idx is then unspecified, but every write stayed in bounds). */
static int FN(topk_row)(int64_t *idx, const REAL *s, const REAL *bias, int64_t K, int64_t E,
                        REAL *vbuf, int64_t *cand, REAL *v2, int64_t *cand2) {
    int nan = 0;
    const REAL *v = s;
    if (bias) {
        for (int64_t e = 0; e < E; e++) vbuf[e] = s[e] + bias[e];
        v = vbuf;
    }
    REAL th = FN(topk_threshold)(v, K, E, v2, &nan);  /* v2 is free until pass 2 */
    int64_t n = 0, e = 0;
#ifdef VEC
    VEC tv = VSET1(th);
    for (; e + VLEN <= E; e += VLEN) {             /* most blocks hold no candidate */
        int mask = VMOVEMASK(VCMPGE(VLOADU(v + e), tv));
        if (mask == 0) continue;
        for (int u = 0; u < VLEN; u++) {           /* branch-free append of the set lanes */
            cand[n] = e + u;
            v2[n] = v[e + u];
            n += (mask >> u) & 1;
        }
    }
#endif
    for (; e < E; e++)
        if (v[e] >= th) { cand[n] = e; v2[n++] = v[e]; }
    if (n <= TOPK_RANK_MAX) {
        int64_t np = n;
#ifdef VEC
        for (; np % VLEN; np++) v2[np] = -(REAL)INFINITY;  /* padding: never above, index >= n */
#endif
        for (int64_t i = 0; i < n; i++) {
            int64_t r = FN(rank_of)(v2, i, n, np);
            if (r < K) idx[r] = cand[i];
        }
    } else {
        int64_t *order = FN(topk_merge_sort)(v2, cand, vbuf, cand2, n);
        for (int64_t j = 0; j < K; j++) idx[j] = order[j];
    }
    return nan;
}

int FN(pymoe_top_k)(int64_t *expert_index, int64_t *expert_load, REAL *prob_sum,
                    const REAL *score, const REAL *bias, const REAL *probs,
                    int64_t T, int64_t K, int64_t E) {
    int64_t TK, TE;
    if (T < 0 || K < 0 || E < 0 || K > E || !size_mul(T, K, &TK) || !size_mul(T, E, &TE))
        return PYMOE_ERR_SIZE;
    REQUIRE(expert_index, TK); REQUIRE(score, TE);
    if (prob_sum != NULL) REQUIRE(probs, TE);
    if (bias != NULL)
        for (int64_t e = 0; e < E; e++)
            if (bias[e] != bias[e]) return PYMOE_ERR_NAN;
    int err = PYMOE_OK, nan = 0;
    if (K > 0 && T > 0) {
#pragma omp parallel num_threads(pymoe_get_max_threads())
        {
            REAL *scratch = (REAL *)malloc(((size_t)E * 2 + 8) * (sizeof(REAL) + sizeof(int64_t)));
            if (scratch == NULL) {
#pragma omp atomic write
                err = PYMOE_ERR_NOMEM;
            }
#pragma omp for schedule(static) reduction(|: nan)
            for (int64_t t = 0; t < T; t++) {          /* each token's row by one thread */
                if (scratch == NULL) continue;
                int64_t *ix = (int64_t *)(scratch + 2 * E + 8);
                nan |= FN(topk_row)(expert_index + t * K, score + t * E, bias, K, E, scratch, ix,
                                    scratch + E, ix + E + 4);
            }
            free(scratch);
        }
    }
    if (err) return err;
    if (nan) return PYMOE_ERR_NAN;
    if (expert_load != NULL) {                     /* integer counts: any order gives the same */
        for (int64_t e = 0; e < E; e++) expert_load[e] = 0;
        for (int64_t i = 0; i < TK; i++) expert_load[expert_index[i]]++;
    }
    if (prob_sum != NULL) {
        /* Column sums in token order (NumPy's probs.sum(axis=0) adds rows in the same order, so
         * the bits agree). Each thread owns a contiguous run of whole cache lines of columns and
         * reads its part of every row front to back, so the loads stream. */
        enum { B = 64 / sizeof(REAL) };           /* columns per cache line */
        int64_t lines = (E + B - 1) / B, parts = pymoe_get_max_threads();
#pragma omp parallel for schedule(static, 1) num_threads(pymoe_get_max_threads())
        for (int64_t part = 0; part < parts; part++) {
            int64_t e0 = lines * part / parts * B, e1 = lines * (part + 1) / parts * B;
            e1 = e1 < E ? e1 : E;
            REAL *restrict acc = prob_sum + e0;
            for (int64_t e = e0; e < e1; e++) prob_sum[e] = 0;
            for (int64_t t = 0; t < T; t++) {
                const REAL *restrict row = probs + t * E;
                for (int64_t e = e0; e < e1; e++) acc[e - e0] += row[e];
            }
        }
    }
    return PYMOE_OK;
}
