/* The expert forms' epilogues for one element type (pymoe/expert_forms.py is the definition):
 * a template body, included by ops_f32.c and ops_f64.c after they define REAL, FN(name) and, for
 * float, PYMOE_F32. Each form is a pair of one-pass loops over one expert's rows:
 *   pymoe_<form>(out = h [rows, H], a [rows, W], args..., rows, H)
 *   pymoe_<form>_backward(out = da [rows, W], dh [rows, H], a [rows, W], args..., rows, H)
 * with W = 2H for the gated forms (a = [gate | up], the gate columns first) and W = H for gelu,
 * relu2 and silu. Every expression is the NumPy twin's, operation by operation, in REAL, and the build
 * has -ffp-contract=off, so the bits are the same; exp is det_exp below, not libm's (whose
 * results differ from NumPy's SIMD exp), written from IEEE-exact operations. */

#ifdef PYMOE_F32
#define EXP_DEGREE 7
static const REAL EXP_COEF[] = {0x1.0p+0f, 0x1.0p+0f, 0x1.0p-1f, 0x1.555556p-3f, 0x1.555556p-5f,
                                0x1.111112p-7f, 0x1.6c16c2p-10f, 0x1.a01a02p-13f};
static const REAL EXP_LO = -0x1.ap+6f, EXP_HI = 0x1.64p+6f, EXP_LOG2E = 0x1.715476p+0f,
                  EXP_SHIFT = 0x1.8p+23f, EXP_LN2_HI = 0x1.62e4p-1f, EXP_LN2_LO = 0x1.7f7d1cp-20f;
#else
#define EXP_DEGREE 13
static const REAL EXP_COEF[] = {0x1.0p+0, 0x1.0p+0, 0x1.0p-1, 0x1.5555555555555p-3,
                                0x1.5555555555555p-5, 0x1.1111111111111p-7, 0x1.6c16c16c16c17p-10,
                                0x1.a01a01a01a01ap-13, 0x1.a01a01a01a01ap-16, 0x1.71de3a556c734p-19,
                                0x1.27e4fb7789f5cp-22, 0x1.ae64567f544e4p-26, 0x1.1eed8eff8d898p-29,
                                0x1.6124613a86d09p-33};
static const REAL EXP_LO = -0x1.75p+9, EXP_HI = 0x1.63p+9, EXP_LOG2E = 0x1.71547652b82fep+0,
                  EXP_SHIFT = 0x1.8p+52, EXP_LN2_HI = 0x1.62e42feep-1,
                  EXP_LN2_LO = 0x1.a39ef35793c76p-33;
#endif
/* gelu_tanh(a) = a sigmoid(2c (a + 0.044715 a^3)): 2c = 2 sqrt(2 / pi), 0.044715, 3 * 0.044715,
 * each the double Python computes, rounded to REAL. */
static const REAL GELU_2C = (REAL)0x1.9884533d43651p+0, GELU_A = (REAL)0x1.6e4e26d4801f7p-5,
                  GELU_3A = (REAL)0x1.12ba9d1f60179p-3;

/* 2^n for n in the normal exponent range, from its bits. */
#ifdef PYMOE_F32
static REAL pow2i(int n) {
    uint32_t bits = (uint32_t)(n + 127) << 23;
    REAL f;
    memcpy(&f, &bits, sizeof f);
    return f;
}
#else
static REAL pow2i(int n) {
    uint64_t bits = (uint64_t)(n + 1023) << 52;
    REAL f;
    memcpy(&f, &bits, sizeof f);
    return f;
}
#endif

/* expert_forms.exp: clamp to [lo, hi] (NaN to 0 meanwhile: converting NaN to int is undefined
 * behaviour), n = rint(x log2 e) by the shifter, Cody-Waite r, Horner, then p * 2^n as
 * (p * 2^n1) * 2^n2 with n1 = n / 2 (truncated) and n2 = n - n1: both factors are normal for
 * every n the clamp lets through, the first product is exact and the second rounds once, so the
 * result is the correctly rounded p * 2^n, which is what NumPy's ldexp returns too (overflow to
 * inf and the subnormals included). No libm call and no branch: the compiler may vectorise the
 * loops that call it. */
static REAL det_exp(REAL x) {
    REAL xc = x < EXP_LO ? EXP_LO : (x > EXP_HI ? EXP_HI : x);
    xc = xc != xc ? 0 : xc;
    REAL n = (xc * EXP_LOG2E + EXP_SHIFT) - EXP_SHIFT;
    REAL r = (xc - n * EXP_LN2_HI) - n * EXP_LN2_LO;
    REAL p = EXP_COEF[EXP_DEGREE];
    for (int k = EXP_DEGREE - 1; k >= 0; k--) p = p * r + EXP_COEF[k];
    int ni = (int)n, n1 = ni / 2;
    REAL out = (p * pow2i(n1)) * pow2i(ni - n1);
    return x != x ? x : out;
}

static REAL sigmoid_(REAL x) { return 1 / (1 + det_exp(-x)); }
static REAL tanh_(REAL z) { return 2 / (1 + det_exp(-(z + z))) - 1; }
static REAL min_(REAL x, REAL lim) { return x > lim ? lim : x; }          /* np.minimum, NaN passes */
static REAL clip_(REAL x, REAL lim) { return x < -lim ? -lim : (x > lim ? lim : x); }
static REAL inside_(REAL x, REAL lim) { return (x >= -lim && x <= lim) ? 1 : 0; } /* clamp's mask */

static void silu_parts(REAL g, REAL *silu, REAL *dsilu) {
    REAL den = 1 + det_exp(-g);
    REAL s = 1 / den;
    *silu = g / den;
    *dsilu = s * (1 + g * (1 - s));
}

static void gelu_parts(REAL a, REAL *act, REAL *dact) {
    REAL k = GELU_2C * (a + GELU_A * (a * a * a));
    REAL s = sigmoid_(k);
    *act = a * s;
    *dact = s + a * s * (1 - s) * (GELU_2C * (1 + GELU_3A * (a * a)));
}

static int form_sizes(int64_t rows, int64_t H, int gated, int64_t *nh, int64_t *na) {
    int64_t W;
    if (rows < 0 || H < 0 || !size_mul(H, gated ? 2 : 1, &W) || !size_mul(rows, H, nh)
        || !size_mul(rows, W, na)) return PYMOE_ERR_SIZE;
    return PYMOE_OK;
}

/* One thread, like the relu epilogues (expert_ops.h): a call is one expert's block, run between
 * two BLAS calls, and OpenMP workers left spinning after a parallel region here took the cores from
 * the BLAS threads of the next matmul (Mixtral-like forward: 180 -> 130 ms with torch's libgomp,
 * which spins). The inner loop vectorises instead: the build's -fno-trapping-math lets GCC turn the
 * selects of det_exp into blends, and PYMOE_SIMD_CLONES gives it AVX2 and AVX-512 (1.9 -> 0.8 ms
 * for a [1024, 2048] SwiGLU); the values are IEEE's either way. */
/* One forward and one backward per form: BODY_F sets h from g, u (u is 0 for the plain forms),
 * BODY_B sets dg and du from dh, g, u; ARGS are the form's float arguments (after a). The bodies
 * declare one variable per statement: a macro argument cannot hold a bare comma. */
#define FORM_PAIR(NAME, GATED, ARGS, BODY_F, BODY_B) \
PYMOE_SIMD_CLONES int FN(pymoe_##NAME)(REAL *out, const REAL *a ARGS, int64_t rows, int64_t H) { \
    int64_t nh, na; \
    if (form_sizes(rows, H, GATED, &nh, &na)) return PYMOE_ERR_SIZE; \
    REQUIRE(out, nh); REQUIRE(a, na); \
    const int64_t W = GATED ? 2 * H : H; \
    for (int64_t i = 0; i < rows; i++) \
        for (int64_t j = 0; j < H; j++) { \
            const REAL g = a[i * W + j]; \
            const REAL u = GATED ? a[i * W + H + j] : 0; \
            REAL h; \
            (void)u; \
            BODY_F \
            out[i * H + j] = h; \
        } \
    return PYMOE_OK; \
} \
/* a += bias, then the forward, in one pass (the first layer's epilogue: a keeps a + bias, which \
 * the backward reads): the two NumPy steps' bits. */ \
PYMOE_SIMD_CLONES int FN(pymoe_##NAME##_bias)(REAL *out, REAL *a, const REAL *bias ARGS, \
                                              int64_t rows, int64_t H) { \
    int64_t nh, na; \
    if (form_sizes(rows, H, GATED, &nh, &na)) return PYMOE_ERR_SIZE; \
    const int64_t W = GATED ? 2 * H : H; \
    REQUIRE(out, nh); REQUIRE(a, na); REQUIRE(bias, rows > 0 ? W : 0); \
    for (int64_t i = 0; i < rows; i++) \
        for (int64_t j = 0; j < H; j++) { \
            const REAL g = a[i * W + j] + bias[j]; \
            const REAL u = GATED ? a[i * W + H + j] + bias[H + j] : 0; \
            REAL h; \
            a[i * W + j] = g; \
            if (GATED) a[i * W + H + j] = u; \
            BODY_F \
            out[i * H + j] = h; \
        } \
    return PYMOE_OK; \
} \
PYMOE_SIMD_CLONES int FN(pymoe_##NAME##_backward)(REAL *out, const REAL *dh_, const REAL *a ARGS, int64_t rows, \
                                int64_t H) { \
    int64_t nh, na; \
    if (form_sizes(rows, H, GATED, &nh, &na)) return PYMOE_ERR_SIZE; \
    REQUIRE(out, na); REQUIRE(dh_, nh); REQUIRE(a, na); \
    const int64_t W = GATED ? 2 * H : H; \
    for (int64_t i = 0; i < rows; i++) \
        for (int64_t j = 0; j < H; j++) { \
            const REAL g = a[i * W + j]; \
            const REAL u = GATED ? a[i * W + H + j] : 0; \
            const REAL dh = dh_[i * H + j]; \
            REAL dg; \
            REAL du = 0; \
            (void)u; \
            BODY_B \
            out[i * W + j] = dg; \
            if (GATED) out[i * W + H + j] = du; \
        } \
    return PYMOE_OK; \
}

#define NO_ARGS
#define LIMIT_ALPHA , REAL limit, REAL alpha
#define LIMIT , REAL limit
#define CAPS , REAL gate_cap, REAL up_cap
#define MASK(c) ((c) ? (REAL)1 : (REAL)0)

FORM_PAIR(gelu, 0, NO_ARGS,
    { REAL act; REAL dact; gelu_parts(g, &act, &dact); h = act; },
    { REAL act; REAL dact; gelu_parts(g, &act, &dact); dg = dh * dact; })

FORM_PAIR(relu2, 0, NO_ARGS,
    { REAL r = (g > 0 || g != g) ? g : 0; r = r + 0; h = r * r; },
    { REAL r = (g > 0 || g != g) ? g : 0; r = r + 0; dg = dh * (r + r); })

FORM_PAIR(silu, 0, NO_ARGS,
    { REAL s; REAL ds; silu_parts(g, &s, &ds); h = s; },
    { REAL s; REAL ds; silu_parts(g, &s, &ds); dg = dh * ds; })

FORM_PAIR(swiglu, 1, NO_ARGS,
    { REAL silu; REAL dsilu; silu_parts(g, &silu, &dsilu); h = silu * u; },
    { REAL silu; REAL dsilu; silu_parts(g, &silu, &dsilu); dg = dh * u * dsilu; du = dh * silu; })

FORM_PAIR(geglu, 1, NO_ARGS,
    { REAL act; REAL dact; gelu_parts(g, &act, &dact); h = act * u; },
    { REAL act; REAL dact; gelu_parts(g, &act, &dact); dg = dh * u * dact; du = dh * act; })

FORM_PAIR(swiglu_oai, 1, LIMIT_ALPHA,
    { REAL gc = min_(g, limit); REAL uc = clip_(u, limit);
      h = (uc + 1) * (gc * sigmoid_(gc * alpha)); },
    { REAL gc = min_(g, limit); REAL uc = clip_(u, limit);
      REAL s = sigmoid_(gc * alpha);
      REAL glu = gc * s;
      REAL dglu = s + gc * alpha * s * (1 - s);
      dg = dh * (uc + 1) * dglu * MASK(g <= limit);
      du = dh * glu * inside_(u, limit); })

FORM_PAIR(swiglu_clamped, 1, LIMIT,
    { REAL silu; REAL dsilu; silu_parts(min_(g, limit), &silu, &dsilu);
      h = silu * clip_(u, limit); },
    { REAL silu; REAL dsilu; silu_parts(min_(g, limit), &silu, &dsilu);
      dg = dh * clip_(u, limit) * dsilu * MASK(g <= limit);
      du = dh * silu * inside_(u, limit); })

FORM_PAIR(swiglu_clamp_after, 1, LIMIT,
    { REAL silu; REAL dsilu; silu_parts(g, &silu, &dsilu);
      h = min_(silu, limit) * clip_(u, limit); },
    { REAL silu; REAL dsilu; silu_parts(g, &silu, &dsilu);
      dg = dh * clip_(u, limit) * dsilu * MASK(silu <= limit);
      du = dh * min_(silu, limit) * inside_(u, limit); })

FORM_PAIR(swiglu_softcap, 1, CAPS,
    { h = tanh_(g / gate_cap) * gate_cap * sigmoid_(g) * (tanh_(u / up_cap) * up_cap); },
    { REAL tg = tanh_(g / gate_cap); REAL tu = tanh_(u / up_cap); REAL s = sigmoid_(g);
      REAL sg = tg * gate_cap; REAL su = tu * up_cap;
      dg = dh * su * ((1 - tg * tg) * s + sg * s * (1 - s));
      du = dh * (sg * s) * (1 - tu * tu); })
