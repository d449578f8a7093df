/* The ggml API shardnet binds: regenerate src/engine/sys.rs with `make bindings`. */
#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"
