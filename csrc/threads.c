/* OpenMP thread control for the C core (a build without OpenMP runs everything on one thread). */
#include "internal.h"

int pymoe_openmp_enabled(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

int pymoe_get_max_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

void pymoe_set_num_threads(int n) {
#ifdef _OPENMP
    static int default_threads = 0;
    if (default_threads == 0) default_threads = omp_get_max_threads();
    omp_set_num_threads(n > 0 ? n : default_threads);
#else
    (void)n;
#endif
}
