/* OpenMP thread control for the C core (a build without OpenMP runs everything on one thread).
 *
 * omp_set_num_threads() changes only the calling OS thread's setting, so a count set from one
 * Python thread would not apply to C calls made from another. The count lives here instead, one
 * value for the whole process, and every parallel region passes it in its num_threads clause. */
#include "internal.h"

#ifdef _OPENMP
static int chosen_threads = 0;  /* 0: the OpenMP default (OMP_NUM_THREADS or the core count) */
static int default_threads = 0; /* omp_get_max_threads() of the first thread that asked */
/* This OS thread's depth of pymoe_one_thread_here brackets: a thread's own, so that one Python
 * thread's layer does not change another's count. */
static __thread int one_thread_depth = 0;
#endif

int pymoe_openmp_enabled(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

int pymoe_get_max_threads(void) {
#ifdef _OPENMP
    int n;
    if (one_thread_depth > 0) return 1;
#pragma omp atomic read
    n = chosen_threads;
    if (n > 0) return n;
#pragma omp critical(pymoe_threads)
    {
        if (default_threads == 0) default_threads = omp_get_max_threads();
        n = default_threads;
    }
    return n;
#else
    return 1;
#endif
}

int pymoe_thread_limit(void) {
#ifdef _OPENMP
    return omp_get_thread_limit();
#else
    return 1;
#endif
}

int pymoe_set_num_threads(int n) {
    if (n > PYMOE_MAX_THREADS) return PYMOE_ERR_SIZE;
#ifdef _OPENMP
    if (n > omp_get_thread_limit()) return PYMOE_ERR_SIZE;
    n = n > 0 ? n : 0;
#pragma omp atomic write
    chosen_threads = n;
#else
    (void)n;
#endif
    return PYMOE_OK;
}

int pymoe_one_thread_here(int enter) {
#ifdef _OPENMP
    if (enter) one_thread_depth++;
    else if (one_thread_depth > 0) one_thread_depth--;
#else
    (void)enter;
#endif
    return PYMOE_OK;
}
