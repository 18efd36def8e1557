/* The message of each error code in pymoe.h, written once: the Python wrapper raises it. */
#include "internal.h"

const char *pymoe_error_string(int code) {
    switch (code) {
    case PYMOE_OK: return "no error";
    case PYMOE_ERR_SIZE: return "a size is negative or a product of sizes overflows int64";
    case PYMOE_ERR_NULL: return "a NULL pointer was passed for a non-empty array";
    case PYMOE_ERR_EXPERT: return "an expert_index entry is outside [0, E)";
    case PYMOE_ERR_POSITION: return "a position entry is outside [-1, C)";
    case PYMOE_ERR_OWNER: return "a slot_owner entry is outside [-1, T*K)";
    case PYMOE_ERR_ORDER: return "token_order is not a permutation of 0..T-1";
    case PYMOE_ERR_NOMEM: return "out of memory";
    case PYMOE_ERR_NAN: return "a score or bias entry is NaN";
    case PYMOE_ERR_PAIRS:
        return "order has an entry outside [0, T*K), a repeated pair, or more than T*K entries";
    default: return "unknown error code";
    }
}
