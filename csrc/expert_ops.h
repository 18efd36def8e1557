/* The expert FFN's elementwise epilogues for one element type: a template body, included by
 * ops_f32.c and ops_f64.c after they define REAL and FN(name). NumPy twins: pymoe.experts.bias_relu
 * and pymoe.experts.relu_backward; the same bits. One pass each over a [rows, cols] block
 * that the expert matmul has just written (so it is still in cache), on the calling thread: the
 * blocks are one expert's, small, and the BLAS threads own the cores between them. */

int FN(pymoe_bias_relu)(REAL *a, const REAL *bias, int64_t rows, int64_t cols) {
    int64_t n;
    if (rows < 0 || cols < 0 || !size_mul(rows, cols, &n)) return PYMOE_ERR_SIZE;
    REQUIRE(a, n); REQUIRE(bias, rows ? cols : 0);
    for (int64_t i = 0; i < rows; i++) {
        REAL *row = a + i * cols;
        for (int64_t j = 0; j < cols; j++) {
            REAL x = row[j] + bias[j];
            row[j] = (x > 0 || x != x) ? x : 0;   /* experts.relu: NaN passes, -0.0 gives +0 */
        }
    }
    return PYMOE_OK;
}

int FN(pymoe_relu_backward)(REAL *grad, const REAL *hidden, int64_t rows, int64_t cols) {
    int64_t n;
    if (rows < 0 || cols < 0 || !size_mul(rows, cols, &n)) return PYMOE_ERR_SIZE;
    REQUIRE(grad, n); REQUIRE(hidden, n);
    REAL *restrict g = grad;                      /* the Python side refuses overlapping arrays */
    const REAL *restrict h = hidden;
    /* NumPy's grad * (hidden > 0): times 1 or 0, so NaN, inf and signed zeros come out as there.
     * In vectors: the compiler keeps the scalar loop's unpredictable branch (half the hidden
     * units are off), which made this pass 15x slower than NumPy's. */
    int64_t i = 0;
#ifdef VEC
    const VEC zero = VZERO(), one = VSET1(1);
    for (; i + VLEN <= n; i += VLEN)              /* the mask's bits AND 1.0: 1.0 or 0.0 */
        VSTOREU(g + i, VMUL(VLOADU(g + i), VAND(VCMPGT(VLOADU(h + i), zero), one)));
#endif
    for (; i < n; i++) g[i] *= h[i] > 0 ? (REAL)1 : (REAL)0;
    return PYMOE_OK;
}
