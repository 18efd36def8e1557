/* Slot assignment: the C twin of pymoe.priority.position_in_expert + pymoe.capacity.drop.
 *
 * The NumPy reference builds a one-hot [K*T, E] matrix in priority order and takes a cumulative
 * sum down it. Walking the same order with one counter per expert computes the same numbers in
 * O(T*K) instead of O(T*K*E): the counter of expert e, when pair (t, j) reaches it, is the
 * count of earlier pairs that chose e, i.e. the cumsum minus one. */
#include <stdlib.h>

#include "internal.h"

/* Return PYMOE_OK iff order[0..T) is a permutation of 0..T-1. */
static int check_order(const int64_t *order, int64_t T) {
    unsigned char *seen = (unsigned char *)calloc((size_t)(T > 0 ? T : 1), 1);
    if (seen == NULL) return PYMOE_ERR_NOMEM;
    int err = PYMOE_OK;
    for (int64_t i = 0; i < T && err == PYMOE_OK; i++) {
        int64_t t = order[i];
        if (t < 0 || t >= T || seen[t]) err = PYMOE_ERR_ORDER;
        else seen[t] = 1;
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
    if (token_order != NULL && (err = check_order(token_order, T)) != PYMOE_OK) return err;

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
