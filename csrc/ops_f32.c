/* float32 instantiation of moe_ops.h. */
#include <stdint.h>

#include "internal.h"

#define REAL float
#define FN(name) name##_f32
#if defined(__SSE2__)
#include <emmintrin.h>
#define VEC __m128
#define VLEN 4
#define VSET1 _mm_set1_ps
#define VZERO _mm_setzero_ps
#define VLOADU _mm_loadu_ps
#define VMUL _mm_mul_ps
#define VADD _mm_add_ps
#define VSTREAM _mm_stream_ps
#endif

#include "moe_ops.h"
