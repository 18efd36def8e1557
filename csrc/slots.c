/* Slot assignment: the C twin of pymoe.priority.position_in_expert + pymoe.capacity.drop.
 *
 * The NumPy reference builds a one-hot [K*T, E] matrix in priority order and takes a cumulative
 * sum down it. Walking the same order with one counter per expert computes the same numbers in
 * O(T*K) instead of O(T*K*E): the counter of expert e, when pair (t, j) reaches it, is the
 * count of earlier pairs that chose e, i.e. the cumsum minus one. */
#include <stdlib.h>

#include "internal.h"

/* Return PYMOE_OK iff the N entries ids[0..N) are distinct and in [0, n); `code` otherwise.
 * With N = n this says ids is a permutation of 0..n-1. */
static int check_distinct(const int64_t *ids, int64_t N, int64_t n, int code) {
    unsigned char *seen = (unsigned char *)calloc((size_t)(n > 0 ? n : 1), 1);
    if (seen == NULL) return PYMOE_ERR_NOMEM;
    int err = PYMOE_OK;
    for (int64_t i = 0; i < N && err == PYMOE_OK; i++) {
        int64_t id = ids[i];
        if (id < 0 || id >= n || seen[id]) err = code;
        else seen[id] = 1;
    }
    free(seen);
    return err;
}

int pymoe_assign_slots(int64_t *position, int64_t *slot_owner, int64_t *expert_load,
                       const int64_t *expert_index, const int64_t *token_order,
                       int64_t T, int64_t K, int64_t E, int64_t C) {
    moe_sizes s;
    int err = check_sizes(&s, T, K, E, C, 0);
    if (err) return err;
    REQUIRE(position, s.TK);
    REQUIRE(expert_index, s.TK);
    REQUIRE(slot_owner, s.EC);
    REQUIRE(expert_load, E);
    for (int64_t i = 0; i < s.TK; i++)
        if (expert_index[i] < 0 || expert_index[i] >= E) return PYMOE_ERR_EXPERT;
    if (token_order != NULL && (err = check_distinct(token_order, T, T, PYMOE_ERR_ORDER)))
        return err;

    for (int64_t e = 0; e < E; e++) expert_load[e] = 0;  /* counters: pairs seen per expert */
    for (int64_t i = 0; i < s.EC; i++) slot_owner[i] = -1;
    for (int64_t j = 0; j < K; j++) {          /* choice-major: all first choices first */
        for (int64_t i = 0; i < T; i++) {      /* tokens in priority order */
            int64_t t = token_order ? token_order[i] : i;
            int64_t e = expert_index[t * K + j];
            int64_t p = expert_load[e]++;      /* earlier pairs that chose e */
            if (p < C) {
                position[t * K + j] = p;
                slot_owner[e * C + p] = t * K + j;
            } else {
                position[t * K + j] = -1;      /* past capacity: dropped */
            }
        }
    }
    return PYMOE_OK;
}

static int check_ordered_args(moe_sizes *s, const int64_t *expert_index, const int64_t *order,
                              int64_t N, int64_t T, int64_t K, int64_t E, int64_t C) {
    int err = check_sizes(s, T, K, E, C, 0);
    if (err) return err;
    REQUIRE(expert_index, s->TK);
    REQUIRE(order, N);
    for (int64_t i = 0; i < s->TK; i++)
        if (expert_index[i] < 0 || expert_index[i] >= E) return PYMOE_ERR_EXPERT;
    if (N < 0 || N > s->TK) return PYMOE_ERR_PAIRS;
    return check_distinct(order, N, s->TK, PYMOE_ERR_PAIRS);  /* distinct pair ids in [0, TK) */
}

int pymoe_assign_slots_ordered(int64_t *position, int64_t *slot_owner, int64_t *expert_load,
                               const int64_t *expert_index, const int64_t *order, int64_t N,
                               int64_t T, int64_t K, int64_t E, int64_t C) {
    moe_sizes s;
    int err = check_ordered_args(&s, expert_index, order, N, T, K, E, C);
    if (err) return err;
    REQUIRE(position, s.TK);
    REQUIRE(slot_owner, s.EC);
    REQUIRE(expert_load, E);
    for (int64_t i = 0; i < s.TK; i++) position[i] = -1;   /* unlisted pairs get no slot */
    for (int64_t i = 0; i < s.EC; i++) slot_owner[i] = -1;
    for (int64_t e = 0; e < E; e++) expert_load[e] = 0;
    for (int64_t i = 0; i < N; i++) {
        int64_t pair = order[i];
        int64_t e = expert_index[pair];
        int64_t p = expert_load[e]++;  /* listed pairs before this one that chose e */
        if (p < C) {
            position[pair] = p;
            slot_owner[e * C + p] = pair;
        }
    }
    return PYMOE_OK;
}

/* Stable merge sort of ranks a[0..n) (indices into order) by score descending; tmp has room for
 * n. Stability keeps equal scores in rank order, i.e. ties go to the pair listed earlier. */
static void sort_by_score(int64_t *a, int64_t *tmp, int64_t n, const int64_t *order,
                          const double *score) {
    for (int64_t width = 1; width < n; width *= 2) {
        for (int64_t lo = 0; lo < n; lo += 2 * width) {
            int64_t mid = lo + width < n ? lo + width : n;
            int64_t hi = lo + 2 * width < n ? lo + 2 * width : n;
            int64_t i = lo, j = mid, o = lo;
            while (i < mid && j < hi)  /* take the right one only if strictly better */
                tmp[o++] = score[order[a[j]]] > score[order[a[i]]] ? a[j++] : a[i++];
            while (i < mid) tmp[o++] = a[i++];
            while (j < hi) tmp[o++] = a[j++];
        }
        for (int64_t i = 0; i < n; i++) a[i] = tmp[i];
    }
}

int pymoe_keep_by_score(uint8_t *keep, const int64_t *expert_index, const int64_t *order,
                        const double *score, int64_t N, int64_t T, int64_t K, int64_t E,
                        int64_t C) {
    moe_sizes s;
    int err = check_ordered_args(&s, expert_index, order, N, T, K, E, C);
    if (err) return err;
    REQUIRE(keep, s.TK);
    REQUIRE(score, s.TK);
    for (int64_t i = 0; i < s.TK; i++) keep[i] = 0;
    /* Bucket the listed pairs by expert, each bucket in listing order (a counting sort). */
    int64_t *start = (int64_t *)calloc((size_t)E + 1, sizeof(int64_t));
    int64_t *ranks = (int64_t *)malloc((size_t)(N > 0 ? N : 1) * sizeof(int64_t));
    int64_t *tmp = (int64_t *)malloc((size_t)(N > 0 ? N : 1) * sizeof(int64_t));
    if (start == NULL || ranks == NULL || tmp == NULL) {
        free(start); free(ranks); free(tmp);
        return PYMOE_ERR_NOMEM;
    }
    for (int64_t i = 0; i < N; i++) start[expert_index[order[i]] + 1]++;
    for (int64_t e = 0; e < E; e++) start[e + 1] += start[e];
    {
        int64_t *fill = (int64_t *)malloc((size_t)(E > 0 ? E : 1) * sizeof(int64_t));
        if (fill == NULL) {
            free(start); free(ranks); free(tmp);
            return PYMOE_ERR_NOMEM;
        }
        for (int64_t e = 0; e < E; e++) fill[e] = start[e];
        for (int64_t i = 0; i < N; i++) ranks[fill[expert_index[order[i]]]++] = i;
        free(fill);
    }
    /* Each expert sorts its own bucket (disjoint ranges of ranks and tmp) and keeps its first C. */
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 1)
#endif
    for (int64_t e = 0; e < E; e++) {
        int64_t lo = start[e], n = start[e + 1] - start[e];
        if (n > C) sort_by_score(ranks + lo, tmp + lo, n, order, score);
        for (int64_t i = 0; i < n && i < C; i++) keep[order[ranks[lo + i]]] = 1;
    }
    free(start); free(ranks); free(tmp);
    return PYMOE_OK;
}
