// The reference shardnet is checked against: llama.cpp itself, driven through llama.h.
// Built by scripts/reference/build.sh from the llama.cpp tree of the crates.io package
// llama-cpp-sys-2 (the same tree vendor/ggml comes from). Not part of `make test`.
//
//   reference tokenize MODEL            texts on stdin, one JSON string per line -> ids per line
//   reference greedy MODEL N ID...      prefill ids, N greedy steps -> JSON tokens + logits
//   reference bench MODEL THREADS PP TG REPS   -> JSON pp/tg tokens/s medians
#include "llama.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
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
    if (argc < 3) die("usage: reference tokenize|greedy|bench MODEL ...");
    llama_log_set(quiet, nullptr);
    llama_backend_init();
    std::string mode = argv[1];
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
        llama_context * ctx = context(model, 512, 0, 512);
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
        std::mt19937 rng(42);
        std::vector<double> pps, tgs;
        for (int r = 0; r <= reps; ++r) {  // r == 0 is the warm-up
            llama_memory_clear(llama_get_memory(ctx), true);
            std::vector<llama_token> toks(pp);
            for (auto & t : toks) t = rng() % n_vocab;
            auto t0 = std::chrono::steady_clock::now();
            if (llama_decode(ctx, llama_batch_get_one(toks.data(), pp))) die("decode failed");
            llama_synchronize(ctx);
            auto t1 = std::chrono::steady_clock::now();
            for (int i = 0; i < tg; ++i) {
                llama_token t = rng() % n_vocab;
                if (llama_decode(ctx, llama_batch_get_one(&t, 1))) die("decode failed");
            }
            llama_synchronize(ctx);
            auto t2 = std::chrono::steady_clock::now();
            if (r == 0) continue;
            pps.push_back(pp / std::chrono::duration<double>(t1 - t0).count());
            tgs.push_back(tg / std::chrono::duration<double>(t2 - t1).count());
        }
        std::sort(pps.begin(), pps.end());
        std::sort(tgs.begin(), tgs.end());
        printf("{\"pp_tps\":%.3f,\"tg_tps\":%.3f}\n", pps[pps.size() / 2], tgs[tgs.size() / 2]);
        llama_free(ctx);
    } else {
        die("unknown mode");
    }
    llama_model_free(model);
    return 0;
}
