/* Shared helpers of the C core: size and index checks, run before any data moves.
 * check_sizes, REQUIRE and check_pair_pointers look only at sizes and pointers; the CUDA host code
 * uses them too. The other checks read the index arrays, so they are for host memory only (on the GPU the kernels
 * check indices themselves). */
#ifndef PYMOE_INTERNAL_H
#define PYMOE_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "pymoe.h"

#ifdef _OPENMP
#include <omp.h>
#endif

/* The elementwise epilogues get wider vectors on CPUs that have them, chosen when the library loads
 * (GCC's target_clones, an ifunc): an element goes through the same IEEE operations at any width
 * (-ffp-contract=off keeps FMA out), so every clone gives the same bits. Left out under the
 * sanitizers (ifunc resolvers run before ASan is set up) and off x86-64 Linux with GCC. */
#if defined(PYMOE_SIMD_ONLY) /* -DPYMOE_SIMD_ONLY=avx2: that clone alone (how each is tested) */
#define PYMOE_STR_(x) #x
#define PYMOE_STR(x) PYMOE_STR_(x)
#define PYMOE_SIMD_CLONES __attribute__((target(PYMOE_STR(PYMOE_SIMD_ONLY))))
#elif defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) \
    && !defined(PYMOE_SANITIZE)
#define PYMOE_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define PYMOE_SIMD_CLONES
#endif

/* *out = a * b for sizes a, b >= 0; returns 0 when the product would overflow int64. */
static inline int size_mul(int64_t a, int64_t b, int64_t *out) {
    if (a < 0 || b < 0) return 0;
    if (a != 0 && b > INT64_MAX / a) return 0;
    *out = a * b;
    return 1;
}

/* The sizes every data-moving function shares: T*K, E*C, T*D and E*C*D must fit in int64,
 * and a pointer may be NULL only when its array is empty. */
typedef struct {
    int64_t TK, EC, TD, ECD;
} moe_sizes;

static inline int check_sizes(moe_sizes *s, int64_t T, int64_t K, int64_t E, int64_t C,
                              int64_t D) {
    if (T < 0 || K < 0 || E < 0 || C < 0 || D < 0) return PYMOE_ERR_SIZE;
    if (!size_mul(T, K, &s->TK) || !size_mul(E, C, &s->EC) || !size_mul(T, D, &s->TD) ||
        !size_mul(s->EC, D, &s->ECD))
        return PYMOE_ERR_SIZE;
    return PYMOE_OK;
}

#define REQUIRE(ptr, n) \
    do { if ((ptr) == NULL && (n) > 0) return PYMOE_ERR_NULL; } while (0)

/* Every expert_index in [0, E) and every position in [-1, C). */
static inline int check_pairs(const int64_t *expert_index, const int64_t *position, int64_t TK,
                              int64_t E, int64_t C) {
    for (int64_t i = 0; i < TK; i++) {
        if (expert_index[i] < 0 || expert_index[i] >= E) return PYMOE_ERR_EXPERT;
        if (position[i] < -1 || position[i] >= C) return PYMOE_ERR_POSITION;
    }
    return PYMOE_OK;
}

/* Every slot_owner entry in [-1, T*K). */
static inline int check_owners(const int64_t *slot_owner, int64_t EC, int64_t TK) {
    for (int64_t i = 0; i < EC; i++)
        if (slot_owner[i] < -1 || slot_owner[i] >= TK) return PYMOE_ERR_OWNER;
    return PYMOE_OK;
}

/* Everything dispatch must know before it moves a byte: sizes, its pointers, every owner. */
static inline int check_dispatch_args(moe_sizes *s, const void *expert_in, const void *x,
                                      const int64_t *slot_owner, int64_t T, int64_t K,
                                      int64_t E, int64_t C, int64_t D) {
    int err = check_sizes(s, T, K, E, C, D);
    if (err) return err;
    REQUIRE(expert_in, s->ECD); REQUIRE(x, s->TD); REQUIRE(slot_owner, s->EC);
    return check_owners(slot_owner, s->EC, s->TK);
}

/* The sizes and pointers of the operations that read expert rows by (expert_index, position)
 * into an output [T, out_cols]: combine (y [T, D], out_cols = D) and the gate gradient
 * (dgate [T, K]). Reads no array, so the CUDA host code uses it too. */
static inline int check_pair_pointers(moe_sizes *s, const void *out, int64_t out_cols,
                                      const void *expert_out, const int64_t *expert_index,
                                      const int64_t *position, int64_t T, int64_t K, int64_t E,
                                      int64_t C, int64_t D) {
    int err = check_sizes(s, T, K, E, C, D);
    if (err) return err;
    REQUIRE(out, out_cols == D ? s->TD : s->TK);  /* T*D and T*K: already checked to fit */
    REQUIRE(expert_out, s->ECD); REQUIRE(expert_index, s->TK); REQUIRE(position, s->TK);
    return PYMOE_OK;
}

/* check_pair_pointers, then every index entry (host memory). */
static inline int check_pair_args(moe_sizes *s, const void *out, int64_t out_cols,
                                  const void *expert_out, const int64_t *expert_index,
                                  const int64_t *position, int64_t T, int64_t K, int64_t E,
                                  int64_t C, int64_t D) {
    int err = check_pair_pointers(s, out, out_cols, expert_out, expert_index, position, T, K, E,
                                  C, D);
    if (err) return err;
    return check_pairs(expert_index, position, s->TK, E, C);
}

/* The gate gradient's: dgate [T, K] out, dy [T, D] and the expert rows in. */
static inline int check_gate_grad_args(moe_sizes *s, const void *dgate, const void *dy,
                                       const void *expert_out, const int64_t *expert_index,
                                       const int64_t *position, int64_t T, int64_t K, int64_t E,
                                       int64_t C, int64_t D) {
    int err = check_pair_args(s, dgate, K, expert_out, expert_index, position, T, K, E, C, D);
    if (err) return err;
    REQUIRE(dy, s->TD);
    return PYMOE_OK;
}

#endif /* PYMOE_INTERNAL_H */
