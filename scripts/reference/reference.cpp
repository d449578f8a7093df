// The reference shardnet is checked against: llama.cpp itself, driven through llama.h.
// Built by scripts/reference/build.sh from the llama.cpp tree of the crates.io package
// llama-cpp-sys-2 (the same tree vendor/ggml comes from). Not part of `make test`.
//
//   reference tokenize MODEL            texts on stdin, one JSON string per line -> ids per line
//   reference greedy MODEL N ID...      prefill ids, N greedy steps -> JSON tokens + logits
//                                       (threads: SHARDNET_REFERENCE_THREADS, else the default)
//   reference bench MODEL THREADS PP TG REPS   -> JSON medians in tokens/s: pp (PP tokens in one
//                                             batch), tg (TG tokens one at a time on an empty
//                                             context), tg_depth (TG tokens after the PP ones);
//                                             the same per CPU second of the process (*_cpu_tps)
//   reference batched MODEL THREADS NPL PROMPT STEPS REPS   -> JSON medians in tokens/s:
//                                       batched (NPL sequences, each its own KV stream as
//                                       llama-batched-bench's default, prefilled with PROMPT
//                                       tokens, then STEPS rounds of one llama_decode holding one
//                                       token of every sequence, greedy from each one's logits;
//                                       prefilled once, positions going on from round to round,
//                                       as shardnet's concurrency bench runs its engine),
//                                       pp512 (512 tokens in one batch, same process and threads,
//                                       runs alternating), their ratio, and the *_cpu_tps
//   reference quantize IN OUT FTYPE     llama_model_quantize (what llama-quantize runs), e.g.
//                                       FTYPE 15 = LLAMA_FTYPE_MOSTLY_Q4_K_M
#include "llama.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <iostream>
#include <random>
#include <string>
#include <vector>

static void die(const char * msg) {
    fprintf(stderr, "reference: %s\n", msg);
    exit(1);
}

static void quiet(ggml_log_level level, const char * text, void *) {
    if (level == GGML_LOG_LEVEL_ERROR) fputs(text, stderr);
}

// Minimal JSON string decoding: the escapes a tokenizer test needs.
static std::string json_string(const std::string & line) {
    std::string out;
    size_t i = line.find('"');
    if (i == std::string::npos) die("expected a JSON string");
    for (++i; i < line.size() && line[i] != '"'; ++i) {
        char c = line[i];
        if (c != '\\') { out += c; continue; }
        char e = line[++i];
        switch (e) {
            case 'n': out += '\n'; break;
            case 't': out += '\t'; break;
            case 'r': out += '\r'; break;
            case '"': out += '"'; break;
            case '\\': out += '\\'; break;
            case '/': out += '/'; break;
            case 'u': {
                unsigned cp = std::stoul(line.substr(i + 1, 4), nullptr, 16);
                i += 4;
                if (cp >= 0xD800 && cp < 0xDC00 && line[i + 1] == '\\') {
                    unsigned lo = std::stoul(line.substr(i + 3, 4), nullptr, 16);
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                    i += 6;
                }
                if (cp < 0x80) out += char(cp);
                else if (cp < 0x800) { out += char(0xC0 | cp >> 6); out += char(0x80 | (cp & 63)); }
                else if (cp < 0x10000) { out += char(0xE0 | cp >> 12); out += char(0x80 | (cp >> 6 & 63)); out += char(0x80 | (cp & 63)); }
                else { out += char(0xF0 | cp >> 18); out += char(0x80 | (cp >> 12 & 63)); out += char(0x80 | (cp >> 6 & 63)); out += char(0x80 | (cp & 63)); }
                break;
            }
            default: die("unsupported escape");
        }
    }
    return out;
}

static llama_model * load(const char * path) {
    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    llama_model * model = llama_model_load_from_file(path, mp);
    if (!model) die("cannot load model");
    return model;
}

static llama_context * context(llama_model * model, int n_ctx, int threads, int n_batch) {
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = n_ctx;
    cp.n_batch = n_batch;
    cp.n_ubatch = n_batch;
    if (threads > 0) { cp.n_threads = threads; cp.n_threads_batch = threads; }
    cp.no_perf = true;
    // Flash attention on, as shardnet's engine always runs it (the CPU's "auto" also picks it).
    cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_ENABLED;
    llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) die("cannot create context");
    return ctx;
}

// Context for NPL parallel sequences: one KV stream of `per_seq` cells per sequence (kv_unified
// off, llama-batched-bench's and llama-server's default), batches up to `n_batch` tokens.
static llama_context * context_seqs(llama_model * model, int npl, int per_seq, int threads, int n_batch) {
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = npl * per_seq;
    cp.n_batch = n_batch;
    cp.n_ubatch = n_batch;
    cp.n_seq_max = npl;
    cp.kv_unified = false;
    if (threads > 0) { cp.n_threads = threads; cp.n_threads_batch = threads; }
    cp.no_perf = true;
    cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_ENABLED;
    llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) die("cannot create context");
    return ctx;
}

static void print_logits(const float * l, int n) {
    printf("[");
    for (int i = 0; i < n; ++i) printf(i ? ",%.9g" : "%.9g", l[i]);
    printf("]");
}

int main(int argc, char ** argv) {
    if (argc < 3) die("usage: reference tokenize|greedy|bench|batched MODEL ...");
    llama_log_set(quiet, nullptr);
    llama_backend_init();
    std::string mode = argv[1];
    if (mode == "quantize") {
        if (argc < 5) die("usage: reference quantize IN OUT FTYPE");
        llama_model_quantize_params qp = llama_model_quantize_default_params();
        qp.ftype = (llama_ftype) atoi(argv[4]);
        if (llama_model_quantize(argv[2], argv[3], &qp) != 0) die("quantize failed");
        return 0;
    }
    llama_model * model = load(argv[2]);
    const llama_vocab * vocab = llama_model_get_vocab(model);
    const int n_vocab = llama_vocab_n_tokens(vocab);

    if (mode == "tokenize") {
        std::string line;
        while (std::getline(std::cin, line)) {
            std::string text = json_string(line);
            std::vector<llama_token> ids(text.size() + 8);
            int n = llama_tokenize(vocab, text.data(), text.size(), ids.data(), ids.size(), false, false);
            if (n < 0) die("tokenize failed");
            printf("[");
            for (int i = 0; i < n; ++i) printf(i ? ",%d" : "%d", ids[i]);
            printf("]\n");
        }
    } else if (mode == "greedy") {
        if (argc < 5) die("usage: reference greedy MODEL N ID...");
        int steps = atoi(argv[3]);
        std::vector<llama_token> prompt;
        for (int i = 4; i < argc; ++i) prompt.push_back(atoi(argv[i]));
        // Threads: SHARDNET_REFERENCE_THREADS, else llama.cpp's default.
        const char * threads = getenv("SHARDNET_REFERENCE_THREADS");
        llama_context * ctx = context(model, 512, threads ? atoi(threads) : 0, 512);
        if (llama_decode(ctx, llama_batch_get_one(prompt.data(), prompt.size()))) die("decode failed");
        printf("{\"prefill_logits\":");
        print_logits(llama_get_logits_ith(ctx, -1), n_vocab);
        std::vector<llama_token> out;
        const float * last = nullptr;
        for (int s = 0; s < steps; ++s) {
            const float * l = llama_get_logits_ith(ctx, -1);
            llama_token t = std::max_element(l, l + n_vocab) - l;
            out.push_back(t);
            if (llama_decode(ctx, llama_batch_get_one(&t, 1))) die("decode failed");
            last = llama_get_logits_ith(ctx, -1);
        }
        printf(",\"tokens\":[");
        for (size_t i = 0; i < out.size(); ++i) printf(i ? ",%d" : "%d", out[i]);
        printf("],\"final_logits\":");
        if (last) print_logits(last, n_vocab); else printf("[]");
        printf("}\n");
        llama_free(ctx);
    } else if (mode == "bench") {
        if (argc < 7) die("usage: reference bench MODEL THREADS PP TG REPS");
        int threads = atoi(argv[3]), pp = atoi(argv[4]), tg = atoi(argv[5]), reps = atoi(argv[6]);
        llama_context * ctx = context(model, pp + tg + 16, threads, pp);
        llama_memory_t mem = llama_get_memory(ctx);
        std::mt19937 rng(42);
        auto decode_one = [&](int n) {
            for (int i = 0; i < n; ++i) {
                llama_token t = rng() % n_vocab;
                if (llama_decode(ctx, llama_batch_get_one(&t, 1))) die("decode failed");
            }
            llama_synchronize(ctx);
        };
        auto seconds = [](auto a, auto b) { return std::chrono::duration<double>(b - a).count(); };
        // CPU seconds of the whole process (every thread): less sensitive to a shared machine's
        // scheduling than wall time.
        auto cpu = []() {
            timespec t;
            clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
            return t.tv_sec + t.tv_nsec * 1e-9;
        };
        // Warm-up: a short batch and a few single steps (weights paged in, buffers sized).
        {
            std::vector<llama_token> toks(std::min(pp, 64));
            for (auto & t : toks) t = rng() % n_vocab;
            if (llama_decode(ctx, llama_batch_get_one(toks.data(), toks.size()))) die("decode failed");
            decode_one(4);
        }
        std::vector<double> pps, tgs, tgds, cpps, ctgs, ctgds;
        for (int r = 0; r < reps; ++r) {
            // pp, then tg on top of it (tg after PP tokens of context).
            llama_memory_clear(mem, true);
            std::vector<llama_token> toks(pp);
            for (auto & t : toks) t = rng() % n_vocab;
            double c0 = cpu();
            auto t0 = std::chrono::steady_clock::now();
            if (llama_decode(ctx, llama_batch_get_one(toks.data(), pp))) die("decode failed");
            llama_synchronize(ctx);
            auto t1 = std::chrono::steady_clock::now();
            double c1 = cpu();
            decode_one(tg);
            auto t2 = std::chrono::steady_clock::now();
            double c2 = cpu();
            // tg on an empty context.
            llama_memory_clear(mem, true);
            double c3 = cpu();
            auto t3 = std::chrono::steady_clock::now();
            decode_one(tg);
            auto t4 = std::chrono::steady_clock::now();
            double c4 = cpu();
            pps.push_back(pp / seconds(t0, t1));
            tgds.push_back(tg / seconds(t1, t2));
            tgs.push_back(tg / seconds(t3, t4));
            cpps.push_back(pp / (c1 - c0));
            ctgds.push_back(tg / (c2 - c1));
            ctgs.push_back(tg / (c4 - c3));
        }
        auto med = [](std::vector<double> v) { std::sort(v.begin(), v.end()); return v[v.size() / 2]; };
        printf("{\"pp_tps\":%.3f,\"tg_tps\":%.3f,\"tg_depth_tps\":%.3f,"
               "\"pp_cpu_tps\":%.3f,\"tg_cpu_tps\":%.3f,\"tg_depth_cpu_tps\":%.3f}\n",
               med(pps), med(tgs), med(tgds), med(cpps), med(ctgs), med(ctgds));
        llama_free(ctx);
    } else if (mode == "batched") {
        if (argc < 8) die("usage: reference batched MODEL THREADS NPL PROMPT STEPS REPS");
        int threads = atoi(argv[3]), npl = atoi(argv[4]), prompt = atoi(argv[5]), steps = atoi(argv[6]),
            reps = atoi(argv[7]);
        const int pp = 512;
        const int warm = std::min(steps, 4);
        if (npl < 1 || prompt < 1 || steps < 1 || reps < 1 || prompt + warm + steps * reps > 4096)
            die("bad batched arguments");
        // Cells per sequence: what the run needs, rounded up to 256 (llama.cpp's n_kv padding),
        // so attention spans the same cells as shardnet's engine at these positions.
        int per_seq = (prompt + warm + steps * reps + 255) / 256 * 256;
        llama_context * pctx = context(model, pp + 16, threads, pp);
        llama_context * bctx = context_seqs(model, npl, per_seq, threads, std::max(npl * prompt, npl));
        std::mt19937 rng(42);
        auto seconds = [](auto a, auto b) { return std::chrono::duration<double>(b - a).count(); };
        auto cpu = []() {
            timespec t;
            clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
            return t.tv_sec + t.tv_nsec * 1e-9;
        };
        llama_batch batch = llama_batch_init(std::max(npl * prompt, npl), 0, 1);
        auto add = [&](llama_token t, int pos, int seq, bool logits) {
            int i = batch.n_tokens++;
            batch.token[i] = t;
            batch.pos[i] = pos;
            batch.n_seq_id[i] = 1;
            batch.seq_id[i][0] = seq;
            batch.logits[i] = logits;
        };
        auto pp_run = [&]() {
            llama_memory_clear(llama_get_memory(pctx), true);
            std::vector<llama_token> toks(pp);
            for (auto & t : toks) t = rng() % n_vocab;
            if (llama_decode(pctx, llama_batch_get_one(toks.data(), pp))) die("decode failed");
            llama_synchronize(pctx);
        };
        // Every sequence prefilled with its own PROMPT tokens (one batch), then decode rounds:
        // one llama_decode with one token of each sequence at position `pos`, each sequence's
        // next token the argmax of its logits.
        std::vector<llama_token> next(npl);
        int pos = prompt;
        auto prefill = [&]() {
            llama_memory_clear(llama_get_memory(bctx), true);
            batch.n_tokens = 0;
            for (int s = 0; s < npl; ++s)
                for (int i = 0; i < prompt; ++i) add(rng() % n_vocab, i, s, i == prompt - 1);
            if (llama_decode(bctx, batch)) die("decode failed");
            for (int s = 0; s < npl; ++s) {
                const float * l = llama_get_logits_ith(bctx, s * prompt + prompt - 1);
                next[s] = std::max_element(l, l + n_vocab) - l;
            }
        };
        auto decode_rounds = [&](int n) {
            for (int r = 0; r < n; ++r) {
                batch.n_tokens = 0;
                for (int s = 0; s < npl; ++s) add(next[s], pos, s, true);
                ++pos;
                if (llama_decode(bctx, batch)) die("decode failed");
                for (int s = 0; s < npl; ++s) {
                    const float * l = llama_get_logits_ith(bctx, s);
                    next[s] = std::max_element(l, l + n_vocab) - l;
                }
            }
        };
        // Warm-up: weights paged in, both contexts' buffers sized.
        pp_run();
        prefill();
        decode_rounds(warm);
        std::vector<double> pps, bs, cpps, cbs;
        for (int r = 0; r < reps; ++r) {
            double c0 = cpu();
            auto t0 = std::chrono::steady_clock::now();
            pp_run();
            auto t1 = std::chrono::steady_clock::now();
            double c1 = cpu();
            decode_rounds(steps);
            auto t2 = std::chrono::steady_clock::now();
            double c2 = cpu();
            pps.push_back(pp / seconds(t0, t1));
            cpps.push_back(pp / (c1 - c0));
            bs.push_back(double(npl) * steps / seconds(t1, t2));
            cbs.push_back(double(npl) * steps / (c2 - c1));
        }
        auto med = [](std::vector<double> v) { std::sort(v.begin(), v.end()); return v[v.size() / 2]; };
        // The ratio of the medians, as shardnet's concurrency bench reports its own.
        printf("{\"npl\":%d,\"pp_tps\":%.3f,\"batched_tps\":%.3f,\"batched_over_pp\":%.4f,"
               "\"pp_cpu_tps\":%.3f,\"batched_cpu_tps\":%.3f,\"batched_over_pp_cpu\":%.4f}\n",
               npl, med(pps), med(bs), med(bs) / med(pps), med(cpps), med(cbs), med(cbs) / med(cpps));
        llama_batch_free(batch);
        llama_free(bctx);
        llama_free(pctx);
    } else {
        die("unknown mode");
    }
    llama_model_free(model);
    return 0;
}
