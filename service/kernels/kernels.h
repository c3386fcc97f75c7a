/* What Python calls in the kernels, and the structs it fills in: the one definition of their
 * layout. The C sources include this file; build.py hands the same text to cffi, which compiles
 * it against them (API mode), so a field added or moved here reaches both sides at once.
 *
 * cffi's parser reads it too: plain C declarations only (build.py drops the # lines).
 * Nothing here aborts the process: every kernel returns a kernel_status, and Python turns a
 * failure into an exception (ops.py), so a failed step ends its requests and the server goes on. */
#ifndef TOKENWIRE_KERNELS_H
#define TOKENWIRE_KERNELS_H

#include <stdint.h>

enum kernel_status {
    KERNEL_OK = 0,
    KERNEL_NO_MEMORY = 1,  /* an allocation failed; nothing was written past what the caller may reuse */
    KERNEL_UNSUPPORTED = 2,  /* this build lacks the instructions the call needs (see ops.py's checks) */
    KERNEL_BAD_ARGUMENT = 3,  /* a position, slot or shape outside what the call was given; nothing written */
};

/* A weight on GGUF blocks, in the layout of block_matmul.c or block_matmul_int8.c. */
typedef struct {
    int64_t bits;  /* 4: Q4_1 (codes, scale, minimum); 8: Q8_0 (codes, scale; minimum if not NULL) */
    int64_t int8_activations;  /* 1: block_matmul_int8.c and its layout; 0: block_matmul.c */
    int64_t out_features, in_features;
    const void *codes;
    const float *scale, *minimum;
    int64_t group;  /* k's per scale: 16 (Q6_K), or 0 / 32 */
    const float *bias;  /* [out_features], added to every row's outputs (Qwen2's q/k/v); NULL: none */
} Matrix;

typedef struct {
    const float *input_norm, *post_attention_norm;  /* RMSNorm weights, [hidden]: before attention, MLP */
    Matrix qkv, o, gate_up, down;  /* q, k, v and gate, up stacked along the outputs */
    /* Beyond a llama's layer; zero (ffi.new's default, and builds before them) is a llama's way. */
    const float *attention_out_norm, *mlp_out_norm;  /* RMSNorm of the attention's, the MLP's output
                                                      * before its residual add (Gemma 2/3); NULL: none */
    const float *q_norm, *k_norm;  /* RMSNorm of every q, k head, [head_dim], before the rotation; NULL: none */
    int64_t window;  /* attend to the last `window` positions, itself included; 0: all */
    const float *rope_cos, *rope_sin;  /* this layer's rotary table, [max_len, rotary_dim / 2] by position
                                        * (the first half: the second repeats it); NULL: the decoder's */
    int64_t no_rope;  /* 1: q and k are not rotated in this layer (SmolLM3's NoPE layers) */
    const float *input_norm_bias, *post_attention_norm_bias;  /* [hidden], added after those norms
                                                                * (StarCoder2's layer norms); NULL: none */
} Layer;

/* A llama decoder for decoder_step.c: every pointer is owned by Python, which keeps it alive. */
typedef struct {
    int64_t layers, hidden, heads, kv_heads, head_dim, intermediate;
    float eps, attention_scale;
    const Layer *layer;
    const float *final_norm;
    Matrix lm_head;  /* out_features 0: the caller runs its own */
    const float *embedding;  /* [vocab, hidden] */
    const float *rope_cos, *rope_sin;  /* [max_len, head_dim] by position; NULL: the caller passes each row's */
    void *cache_k, *cache_v;  /* [layers, max_rows, kv_heads, max_len, head_dim] */
    int64_t half_cache;  /* 1: the cache holds float16, else float32 */
    int64_t max_rows, max_len;
    /* Beyond a llama; zero is a llama's way (see Layer) */
    float embedding_scale;  /* the embeddings times this (Gemma: sqrt(hidden)); 0: as they are */
    int64_t activation;  /* of the gated MLP: 0 SiLU, 1 GELU's tanh approximation (Gemma) */
    Matrix embedding_blocks;  /* where `embedding` is NULL: the rows of these blocks (the tied lm_head's) */
    int64_t rotary_dim;  /* the leading dimensions of each q/k head the rope rotates (Phi-3's partial
                          * rotary factor), the rest pass; 0: all of head_dim */
    int64_t whole_qk_norm;  /* 1: q_norm and k_norm span all the q, all the k heads ([heads * head_dim],
                             * one RMS over them: OLMo 2); 0: each head alone ([head_dim]) */
    float attention_softcap;  /* scores -> softcap * tanh(scores / softcap) (Gemma 2); 0: none */
    float residual_scale;  /* each sublayer's output times this before its residual add (Granite); 0: 1 */
    /* A layer's input_norm or post_attention_norm NULL: its attention or MLP takes x as it is (OLMo 2,
     * whose norms come after them) */
    int64_t layer_norm;  /* 1: every norm subtracts the mean first (LayerNorm: StarCoder2, Command R),
                          * its bias added where it has one; 0: RMSNorms */
    const float *final_norm_bias;  /* [hidden]; NULL: none */
    int64_t ungated_mlp;  /* 1: gate_up holds the up projection alone, and the MLP is down(act(up))
                           * (StarCoder2); 0: down(act(gate) * up) */
    int64_t parallel;  /* 1: the MLP takes the attention's input norm too, and both outputs are added to
                        * the residual together (Command R); 0: one after the other */
    int64_t interleaved_rope;  /* 1: the rope rotates pairs (2i, 2i + 1), by a table whose entries come
                                * in pairs (Command R); 0: halves (i, i + rotary_dim / 2) */
    int64_t qk_norm_per_head;  /* 1: q_norm and k_norm hold a row of weights per head ([heads, head_dim],
                                * Command R); 0: one row for all heads */
} Decoder;

/* block_matmul.c: y[M, N] = x[M, K] @ W.T on float32 activations */
int q4_matmul(const float *x, int64_t M, int64_t K, const uint8_t *codes, const float *scale,
              const float *minimum, int64_t N, float *y, int threads);
int q8_matmul(const float *x, int64_t M, int64_t K, const int8_t *codes, const float *scale,
              int64_t N, float *y, int threads);
/* 8-bit codes with a minimum per group (NULL: none) and groups of `group` (16 or 32) k's */
int q8_matmul_groups(const float *x, int64_t M, int64_t K, const int8_t *codes, const float *scale,
                     const float *minimum, int64_t group, int64_t N, float *y, int threads);

/* block_matmul_int8.c: the same on activations rounded to 8 bits (AVX512-VNNI builds only) */
int int8_activations(void);
int amx_int8(void);  /* 1: this build and CPU run those sums on AMX tiles (for 16 rows and more) */
void kernels_use_amx(int on);  /* 0: never (the results are the same bits; tests compare both) */
int q4_matmul_int8(const float *x, int64_t M, int64_t K, const uint8_t *codes, const float *scale,
                   const float *minimum, int64_t N, float *y, int threads);
int q8_matmul_int8(const float *x, int64_t M, int64_t K, const uint8_t *codes, const float *scale,
                   int64_t N, float *y, int threads);
int q8_matmul_groups_int8(const float *x, int64_t M, int64_t K, const uint8_t *codes, const float *scale,
                          const float *minimum, int64_t group, int64_t N, float *y, int threads);

/* decode_attention.c: each row attends to its last `window` positions (0: all), its scores soft-capped
 * by `softcap` (0: not) */
int half_kv_cache(void);
int decode_attention(const float *q, int64_t q_row, int64_t q_head, const float *k, int64_t k_row, int64_t k_head,
                     const float *v, int64_t v_row, int64_t v_head, void *cache_k, void *cache_v, int half,
                     const int64_t *positions, const int64_t *slots, int64_t rows, int64_t heads, int64_t kv_heads,
                     int64_t head_dim, int64_t max_rows, int64_t max_len, int64_t window, float softcap, float scale,
                     float *out, int threads);

/* decoder_step.c */
int decoder_step(const Decoder *d, const int64_t *ids, float *x, const float *cos, const float *sin,
                 const int64_t *positions, const int64_t *slots, int64_t rows, float *logits,
                 int64_t *argmax, int threads);
void argmax_rows(const float *logits, int64_t rows, int64_t vocab, int64_t *argmax, int threads);
/* out[i] = row ids[i] of a Matrix's weight in float32, as its blocks dequantize (quantized.py) */
void matrix_rows(const Matrix *m, const int64_t *ids, int64_t n, float *out);

/* cpu.c: which builds this CPU runs (ops.py picks the best at load) */
int kernels_cpu_level(void);

/* alloc.c: make the `after`-th allocation from now fail, once (-1: none); for tests of the
 * failure path. */
void kernels_fail_allocation(int64_t after);

#endif
