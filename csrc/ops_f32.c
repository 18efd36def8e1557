/* float32 instantiation of moe_ops.h, topk_ops.h, expert_ops.h and expert_forms.h. */
#include <stdint.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

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
#define VSTOREU _mm_storeu_ps
#define VMUL _mm_mul_ps
#define VADD _mm_add_ps
#define VSTREAM _mm_stream_ps
#define VMAX _mm_max_ps
#define VCMPGT _mm_cmpgt_ps
#define VCMPGE _mm_cmpge_ps
#define VCMPEQ _mm_cmpeq_ps
#define VCMPUNORD _mm_cmpunord_ps
#define VAND _mm_and_ps
#define VOR _mm_or_ps
#define VMOVEMASK _mm_movemask_ps
#endif

#include "moe_ops.h"
#include "topk_ops.h"
#include "expert_ops.h"
#define PYMOE_F32
#include "expert_forms.h"
