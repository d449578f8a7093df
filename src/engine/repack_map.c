/* shardnet's one addition to ggml's C API (compiled by build.rs beside the vendored tree, which
 * stays unmodified): wrap memory that already holds tensors in the CPU backend's repack layout
 * (a read-only map of the repack sidecar file) as a buffer of the repack buffer type, so matrix
 * products on those tensors run the repack kernels. ggml itself only makes such buffers by
 * allocating anonymous memory and repacking into it; the buffer struct is in
 * ggml-backend-impl.h, which the Rust bindings do not cover. */
#include "ggml-backend-impl.h"
#include "ggml-cpu.h"

/* Returns NULL when `repack_buft` cannot allocate a probe buffer. The result does not own
 * `ptr` (freeing it frees only the wrapper); tensors placed in it with ggml_backend_tensor_alloc
 * get the repack kernel ggml picks for this CPU (the buffer type's init_tensor). */
ggml_backend_buffer_t shardnet_repacked_buffer_from_ptr(ggml_backend_buffer_type_t repack_buft, void * ptr, size_t size) {
    ggml_backend_buffer_t probe = ggml_backend_buft_alloc_buffer(repack_buft, 64);
    if (probe == NULL || probe->iface.init_tensor == NULL) {
        if (probe != NULL) {
            ggml_backend_buffer_free(probe);
        }
        return NULL;
    }
    ggml_backend_buffer_t buf = ggml_backend_cpu_buffer_from_ptr(ptr, size);
    if (buf != NULL) {
        buf->buft = repack_buft;
        buf->iface.init_tensor = probe->iface.init_tensor;
        /* The map is read-only: nothing may write into it. */
        buf->iface.set_tensor = NULL;
        buf->iface.memset_tensor = NULL;
        buf->iface.cpy_tensor = NULL;
        buf->iface.clear = NULL;
    }
    ggml_backend_buffer_free(probe);
    return buf;
}
