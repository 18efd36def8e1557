/* float64 instantiation of moe_ops.h, topk_ops.h, expert_ops.h and expert_forms.h. */
#include <stdint.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#define REAL double
#define FN(name) name##_f64
#if defined(__SSE2__)
#include <emmintrin.h>
#define VEC __m128d
#define VLEN 2
#define VSET1 _mm_set1_pd
#define VZERO _mm_setzero_pd
#define VLOADU _mm_loadu_pd
#define VSTOREU _mm_storeu_pd
#define VMUL _mm_mul_pd
#define VADD _mm_add_pd
#define VSTREAM _mm_stream_pd
#define VMAX _mm_max_pd
#define VCMPGT _mm_cmpgt_pd
#define VCMPGE _mm_cmpge_pd
#define VCMPEQ _mm_cmpeq_pd
#define VCMPUNORD _mm_cmpunord_pd
#define VAND _mm_and_pd
#define VOR _mm_or_pd
#define VMOVEMASK _mm_movemask_pd
#endif

#include "moe_ops.h"
#include "topk_ops.h"
#include "expert_ops.h"
#include "expert_forms.h"
