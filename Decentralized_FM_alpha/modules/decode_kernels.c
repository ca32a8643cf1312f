/* CPU kernels for decoding one token (batch 1; float32 activations and sums, weights in
   float32, bfloat16 or float16: weight_type), called through ctypes from cpu_kernels.py. Their row-parallel parts run on a pool of threads (dejavu_set_threads);
   every function returns 0, or non-zero on bad input. */
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#if defined(__AVX2__) || defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
typedef float v8 __attribute__((vector_size(32)));
static inline v8 ld(const float* p) { v8 v; memcpy(&v, p, sizeof v); return v; }
static inline void st(float* p, v8 v) { memcpy(p, &v, sizeof v); }
static inline float hsum(v8 v) { float s = 0.f; for (int i = 0; i < 8; i++) s += v[i]; return s; }
static inline v8 splat(float f) { v8 c = {0}; return c + f; }

/* Eight float16 values as floats (F16C where the compiler targets it). */
#if defined(__F16C__)
static inline v8 ldh(const uint16_t* p) { return (v8)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
static inline float half_float(uint16_t u) { return _cvtsh_ss(u); }
#else
static inline float half_float(uint16_t u) {
  uint32_t sign = (uint32_t)(u & 0x8000) << 16, exp = (u >> 10) & 0x1f, man = u & 0x3ff, bits;
  if (exp == 0x1f) bits = sign | 0x7f800000u | (man << 13);             /* inf, NaN */
  else if (exp) bits = sign | ((exp + 112) << 23) | (man << 13);         /* normal */
  else if (!man) bits = sign;                                            /* zero */
  else {                                                                 /* subnormal */
    float f = (float)man * (1.f / 16777216.f);                           /* man * 2^-24 */
    memcpy(&bits, &f, 4); bits |= sign;
  }
  float f; memcpy(&f, &bits, 4); return f;
}
static inline v8 ldh(const uint16_t* p) { v8 v; for (int i = 0; i < 8; i++) v[i] = half_float(p[i]); return v; }
#endif

/* Eight bfloat16 values as floats: a bfloat16 is the top half of a float32's bits (AVX2 widens
   eight at a time). */
static inline float bf16_float(uint16_t u) { uint32_t b = (uint32_t)u << 16; float f; memcpy(&f, &b, 4); return f; }
#if defined(__AVX2__)
static inline v8 ldbf(const uint16_t* p) {
  return (v8)_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
#else
static inline v8 ldbf(const uint16_t* p) {
  uint32_t u[8]; for (int i = 0; i < 8; i++) u[i] = (uint32_t)p[i] << 16;
  v8 v; memcpy(&v, u, sizeof v); return v;
}
#endif

/* ABI BEGIN ====================================================================================
   Everything Python calls. cpu_kernels.py builds its ctypes structs and function signatures
   from this block alone, so it keeps a regular form: `#define NAME integer`,
   `typedef enum { A, B } name;`, `typedef struct { ... } name;` with one field per line
   (`[const] type name;` or `[const] type* name;`), and the prototypes of every exported
   function (the compiler checks each definition against its prototype). Types: float, int,
   int64_t, enums, pointers to float, int64_t, uint8_t, void and char, and pointers to the
   structs above them. */

#define MAX_THREADS 256  /* the most threads dejavu_set_threads takes */

/* The element type of the weight matrices a struct below points at (the products' rows):
   float32, bfloat16 or IEEE float16. Norm weights, biases, activations, caches and every sum
   stay float32. */
typedef enum { WEIGHTS_F32, WEIGHTS_BF16, WEIGHTS_F16 } weight_type;

/* One Llama decoder layer's weights ([out, in] rows, of type `weights`); NULL biases: none. The
   MLP's six may be NULL where the layer runs another MLP (mlp_step). */
typedef struct {
  const float* attn_norm;
  const void* q;
  const void* k;
  const void* v;
  const void* o;
  const float* q_bias;
  const float* k_bias;
  const float* v_bias;
  const float* o_bias;
  const float* mlp_norm;
  const void* gate;
  const void* up;
  const void* down;
  const float* gate_bias;
  const float* up_bias;
  const float* down_bias;
  int64_t hidden;
  int64_t heads;
  int64_t kv_heads;
  int64_t head_dim;
  int64_t inner;
  float attn_eps;
  float mlp_eps;
  weight_type weights;
} llama_layer;

/* One OPT decoder layer's weights: pre-LN (norm_first) or post-LN; LayerNorm weights and biases
   and the Linears' biases may be NULL (no affine, no bias). */
typedef struct {
  const float* attn_norm;
  const float* attn_norm_bias;
  const void* q;
  const void* k;
  const void* v;
  const void* o;
  const float* q_bias;
  const float* k_bias;
  const float* v_bias;
  const float* o_bias;
  const float* mlp_norm;
  const float* mlp_norm_bias;
  const void* fc1;
  const void* fc2;
  const float* fc1_bias;
  const float* fc2_bias;
  int64_t hidden;
  int64_t heads;
  int64_t head_dim;
  int64_t inner;
  int64_t norm_first;
  float attn_eps;
  float mlp_eps;
  weight_type weights;
} opt_layer;

/* A sparse MLP's weights as the gathered kernels read them: rows i of A and B (first and
   second: gate and up, or fc1 and no B) and of T (output transposed: down/fc2 [rows, d]), each
   with its own row stride (the packed layout interleaves them); biases may be NULL. B NULL
   means ReLU(A h + a_bias), else SiLU(A h + a_bias) * (B h + b_bias). Strides count elements
   of A's, B's and T's type (weights). */
typedef struct {
  const void* A;
  const void* B;
  const float* a_bias;
  const float* b_bias;
  const void* T;
  const float* bias;
  int64_t lda;
  int64_t ldb;
  int64_t ldt;
  int64_t rows;
  int64_t d;
  weight_type weights;
} mlp_weights;

/* DejaVu's low-rank predictor, scores = P2 (P1 x) with P1 [rank, d] and P2 [rows, rank], each
   stored tiled: eight output rows at a time, column by column (tile b holds W[8b + q][j] at
   [b][j][q]; rows padded to a multiple of 8 with zeros), so a product reads long sequential
   runs and accumulates eight outputs in a vector, in float32, bfloat16 or float16 (weights). */
typedef struct {
  const void* p1;
  const void* p2;
  int64_t rank;
  int64_t d;
  int64_t rows;
  weight_type weights;
} predictor_weights;

/* TEAL's MLP: gate and up (fc1) read by input column, one row of in_t each [d rows of ld_in
   floats]: gate's column j at in_t + j * ld_in, up's at + up_offset (inner: right after it; 0:
   no up, OPT's ReLU MLP); down (fc2) read by neuron, down_t [inner rows of ld_down]. in_t and
   down_t hold elements of type weights (the strides count them). */
typedef struct {
  const void* in_t;
  const float* gate_bias;
  const float* up_bias;
  const void* down_t;
  const float* down_bias;
  int64_t ld_in;
  int64_t up_offset;
  int64_t ld_down;
  int64_t d;
  int64_t inner;
  weight_type weights;
} teal_weights;

/* One token's step through a decoder layer: x_out = x + attn(norm(x)), then + mlp(norm(.)).
   The layer's new key and value are written at position t (the positions before the token) of
   its cache, K and V [kv_heads, capacity, head_dim] with head_stride floats from one head to
   the next; the query attends to positions 0..t whose key_valid is set (NULL: all; position t
   always). cos and signed_sin: Llama's RoPE tables of the position (NULL for OPT). */
typedef struct {
  const float* x;
  float* x_out;
  float* k_cache;
  float* v_cache;
  int64_t head_stride;
  int64_t t;
  const float* cos;
  const float* signed_sin;
  const uint8_t* key_valid;
  float scale;
} layer_step;

/* The MLP a layer call runs after its attention half:
   MLP_NONE       none: x_out = x + attn, and the MLP's input norm(x_out) into mlp_input
                  (unless NULL), for an MLP that runs apart;
   MLP_DENSE      the layer's own MLP;
   MLP_PREDICTED  DejaVu's (dejavu_predicted_mlp): mlp, predictor, k; the predictor reads x with
                  predict_from_input (a look-ahead input), else x + attn;
   MLP_TEAL       TEAL's (dejavu_teal_mlp): teal, t_in, t_down; kept [2]: inputs, neurons kept;
   MLP_CATS       CATS's (dejavu_cats_mlp): mlp, t_gate; kept [1]: neurons kept.
   Fields a kind does not name are not read. */
typedef enum { MLP_NONE, MLP_DENSE, MLP_PREDICTED, MLP_TEAL, MLP_CATS } mlp_kind;

typedef struct {
  mlp_kind kind;
  const mlp_weights* mlp;
  const predictor_weights* predictor;
  const teal_weights* teal;
  int64_t k;
  int64_t predict_from_input;
  float t_in;
  float t_down;
  float t_gate;
  int64_t* kept;
  float* mlp_input;
} mlp_step;

/* The thread pool: threads counts the caller; set returns non-zero where n is not in
   [1, MAX_THREADS]; set_min_chunk (tests) returns the old value. */
int dejavu_set_threads(int64_t n);
int dejavu_get_threads(void);
int64_t dejavu_set_min_chunk(int64_t floats);

/* sizeof the ABI struct named `name` (0: no such struct), to check Python's layout against. */
int64_t dejavu_struct_size(const char* name);

/* How this build reads half-precision weights: bit 0 set where bfloat16 rows widen eight at a
   time (AVX2), bit 1 where float16 rows do (F16C); else one element at a time. */
int dejavu_weight_paths(void);

/* The MLP kernels of one token (the weights of `weights` type). */
int dejavu_gathered_dots(const void* A, int64_t lda, const void* B, int64_t ldb, const float* bias_a,
                         const float* bias_b, const int64_t* idx, int64_t K, int64_t rows, int64_t d,
                         const float* h, float* out_a, int64_t act, weight_type weights);
int dejavu_dense_mlp(const void* A, int64_t lda, const void* B, int64_t ldb, const float* a_bias,
                     const float* b_bias, const void* W, int64_t ldw, const float* bias, int64_t inner, int64_t d,
                     const float* h, float* out, float* scratch, weight_type weights);
int dejavu_gathered_mlp(const mlp_weights* W, const int64_t* idx, int64_t K, const float* h, float* out);
int dejavu_predicted_mlp(const mlp_weights* W, const predictor_weights* P, const float* xp, int64_t K,
                         const float* h, const float* residual, float* out, int64_t* neurons);
int dejavu_cats_mlp(const mlp_weights* W, float threshold, const float* h, float* out, int64_t* kept);
int dejavu_teal_mlp(const teal_weights* W, float t_in, float t_down, const float* h, float* out, int64_t* kept);

/* One decoder layer for one token, its MLP as M says (OPT: MLP_DENSE only). */
int dejavu_llama_layer(const llama_layer* L, const mlp_step* M, const layer_step* S);
int dejavu_opt_layer(const opt_layer* L, const mlp_step* M, const layer_step* S);

/* ABI END ====================================================================================== */

/* ------------------------------------------------------------------------------------------
   The thread pool. Decoding streams every weight once per token, and one core cannot use all
   of the memory bandwidth: so each kernel splits its rows over dejavu_set_threads(n) threads,
   the caller and n - 1 workers made once.

   parallel_for(n, align, cost, fn, ctx) runs fn(ctx, begin, end) over [0, n) cut into chunks
   whose bounds are multiples of `align` (so a kernel groups its rows as it does in one piece),
   at most CHUNKS_PER_THREAD per thread and none under min_chunk floats of work (`cost` per
   item): small products stay on the caller. The threads claim chunks from one counter, so
   each output is computed by exactly one thread with the same instructions whatever the
   thread count (the results are bitwise the same for any n), and a worker that is late (asleep,
   or its core busy with another process) only takes fewer chunks. A dispatch is cheap while
   the workers spin, small against the weights a product streams; an idle worker spins SPIN_NS
   (a decoder layer calls its products microseconds apart, the next layer comes tens of
   microseconds later), then sleeps
   on a condition variable, so an idle process burns no CPU. Calls from two threads at once are
   safe: the second runs its job on its own thread. */
typedef void (*range_fn)(void* ctx, int64_t begin, int64_t end);

#define CHUNKS_PER_THREAD 2  /* few, long streams, yet some slack for a late worker */
#define DEFAULT_MIN_CHUNK 16384 /* floats (64 kB): a chunk streams for longer than a dispatch costs */
#define SPIN_NS 300000        /* an idle worker spins this long, then sleeps */
#define YIELD_AFTER_NS 20000  /* and from this on yields its core while it spins (torch's OpenMP
                                 threads, other processes) */

static struct {
  /* The posted job. claim = generation << 32 | chunks << 16 | next chunk to take: a thread takes
     chunk `next` by a compare-and-swap that also checks the job is still the one it read. */
  _Atomic uint64_t claim;
  _Atomic(range_fn) fn;
  _Atomic(void*) ctx;
  _Atomic int64_t n, align;
  _Atomic int64_t done;       /* chunks finished */
  _Atomic uint32_t generation;
  _Atomic int sleepers, keep; /* workers asleep; workers with index >= keep exit */
  atomic_flag busy;           /* a caller owns the pool */
  pthread_mutex_t lock;
  pthread_cond_t wake;
  _Atomic int threads;        /* the caller included (read by callers that find the pool busy too) */
  _Atomic int64_t min_chunk;
  int workers, failed;        /* with the pool owned */
  pthread_t ids[MAX_THREADS];
  uint32_t made_at[MAX_THREADS]; /* the generation when each worker was made */
} pool = {.busy = ATOMIC_FLAG_INIT, .lock = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER,
          .threads = 1, .min_chunk = DEFAULT_MIN_CHUNK};

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  __asm__ __volatile__("yield");
#endif
}

static int64_t now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static inline int64_t chunk_bound(int64_t c, int64_t chunks, int64_t n, int64_t align) {
  int64_t units = (n + align - 1) / align, b = units * c / chunks * align;
  return b < n ? b : n;
}

/* Take and run chunks of job `generation` until none is left. */
static void run_chunks(uint32_t generation) {
  range_fn fn = atomic_load_explicit(&pool.fn, memory_order_relaxed);
  void* ctx = atomic_load_explicit(&pool.ctx, memory_order_relaxed);
  int64_t n = atomic_load_explicit(&pool.n, memory_order_relaxed);
  int64_t align = atomic_load_explicit(&pool.align, memory_order_relaxed);
  uint64_t word = atomic_load_explicit(&pool.claim, memory_order_acquire);
  for (;;) {
    uint64_t next = word & 0xffff, chunks = (word >> 16) & 0xffff;
    if ((uint32_t)(word >> 32) != generation || next >= chunks) return;
    /* Success proves the job was unfinished, so the fields above were read from it. */
    if (!atomic_compare_exchange_weak_explicit(&pool.claim, &word, word + 1, memory_order_acq_rel,
                                               memory_order_acquire))
      continue;
    fn(ctx, chunk_bound((int64_t)next, (int64_t)chunks, n, align),
       chunk_bound((int64_t)next + 1, (int64_t)chunks, n, align));
    atomic_fetch_add_explicit(&pool.done, 1, memory_order_release);
    word = atomic_load_explicit(&pool.claim, memory_order_acquire);
  }
}

static void* worker(void* arg) {
  int index = (int)(intptr_t)arg;
  uint32_t seen = pool.made_at[index];  /* not a fresh read: a job, or the call stopping this worker,
                                           may have been posted before the thread first ran */
  for (;;) {
    uint32_t generation = atomic_load_explicit(&pool.generation, memory_order_acquire);
    for (int64_t spins = 0, start = 0, waited = 0; generation == seen; spins++) {  /* spin a while */
      if (waited < YIELD_AFTER_NS) cpu_relax();
      else sched_yield();  /* past the gaps within a layer: let other threads on this core run */
      generation = atomic_load_explicit(&pool.generation, memory_order_acquire);
      if (spins % 64 == 0) {
        if (!start) start = now_ns();
        else if ((waited = now_ns() - start) > SPIN_NS) break;
      }
    }
    if (generation == seen) {  /* then sleep (dispatch wakes the sleepers it counts) */
      pthread_mutex_lock(&pool.lock);
      atomic_fetch_add(&pool.sleepers, 1);
      while ((generation = atomic_load(&pool.generation)) == seen) pthread_cond_wait(&pool.wake, &pool.lock);
      atomic_fetch_sub(&pool.sleepers, 1);
      pthread_mutex_unlock(&pool.lock);
    }
    seen = generation;
    if (index >= atomic_load(&pool.keep)) return 0;
    run_chunks(generation);
  }
}

/* Post a job of `chunks` chunks (0: none, to wake the workers) and wake the sleepers. */
static uint32_t post(range_fn fn, void* ctx, int64_t n, int64_t align, int64_t chunks) {
  uint32_t generation = atomic_load_explicit(&pool.generation, memory_order_relaxed) + 1;
  atomic_store_explicit(&pool.fn, fn, memory_order_relaxed);
  atomic_store_explicit(&pool.ctx, ctx, memory_order_relaxed);
  atomic_store_explicit(&pool.n, n, memory_order_relaxed);
  atomic_store_explicit(&pool.align, align, memory_order_relaxed);
  atomic_store_explicit(&pool.done, 0, memory_order_relaxed);
  atomic_store_explicit(&pool.claim, (uint64_t)generation << 32 | (uint64_t)chunks << 16, memory_order_release);
  atomic_store(&pool.generation, generation);
  if (atomic_load(&pool.sleepers)) {
    pthread_mutex_lock(&pool.lock);
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.lock);
  }
  return generation;
}

/* With the pool owned: run exactly `threads - 1` workers (start or stop some). */
static void resize_workers(void) {
  int want = pool.threads - 1;
  if (pool.workers > want) {
    atomic_store(&pool.keep, want);
    post(0, 0, 0, 1, 0);
    for (int i = want; i < pool.workers; i++) pthread_join(pool.ids[i], 0);
    pool.workers = want;
  }
  atomic_store(&pool.keep, MAX_THREADS);
  if (pool.workers < want && !pool.failed) {
    sigset_t all, old;  /* signals stay with the threads Python runs */
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    while (pool.workers < want && !pool.failed) {
      pool.made_at[pool.workers] = atomic_load(&pool.generation);
      if (pthread_create(&pool.ids[pool.workers], 0, worker, (void*)(intptr_t)pool.workers)) pool.failed = 1;
      else pool.workers++;
    }
    pthread_sigmask(SIG_SETMASK, &old, 0);
  }
}

/* A child forked while workers ran has none of them: it starts its own on its first job. */
static void forked_child(void) {
  pthread_mutex_init(&pool.lock, 0);
  pthread_cond_init(&pool.wake, 0);
  atomic_store(&pool.sleepers, 0);
  atomic_flag_clear(&pool.busy);
  pool.workers = pool.failed = 0;
}

__attribute__((constructor)) static void pool_init(void) { pthread_atfork(0, 0, forked_child); }

/* How many chunks parallel_for cuts n items of `cost` floats into (1: it runs them in one piece). */
static int64_t chunks_for(int64_t n, int64_t align, int64_t cost) {
  int64_t units = (n + align - 1) / align, chunks = (int64_t)pool.threads * CHUNKS_PER_THREAD;
  if (chunks > units) chunks = units;
  if (chunks > n * cost / pool.min_chunk) chunks = n * cost / pool.min_chunk;
  return chunks;
}

static void parallel_for(int64_t n, int64_t align, int64_t cost, range_fn fn, void* ctx) {
  int64_t chunks = pool.threads > 1 ? chunks_for(n, align, cost) : 1;
  if (chunks < 2 || atomic_flag_test_and_set_explicit(&pool.busy, memory_order_acquire)) {
    if (n > 0) fn(ctx, 0, n);  /* in one piece, on this thread */
    return;
  }
  if (pool.workers < pool.threads - 1) resize_workers();  /* the first job (or the first since a fork) */
  uint32_t generation = post(fn, ctx, n, align, chunks);
  run_chunks(generation);
  while (atomic_load_explicit(&pool.done, memory_order_acquire) < chunks) cpu_relax();
  atomic_flag_clear_explicit(&pool.busy, memory_order_release);
}

/* The number of threads the kernels run on (the caller included); 0, or 1 where n is not in
   [1, MAX_THREADS]. A job running on another thread finishes first. */
int dejavu_set_threads(int64_t n) {
  if (n < 1 || n > MAX_THREADS) return 1;
  while (atomic_flag_test_and_set_explicit(&pool.busy, memory_order_acquire)) cpu_relax();
  pool.threads = (int)n;
  pool.failed = 0;
  resize_workers();
  atomic_flag_clear_explicit(&pool.busy, memory_order_release);
  return 0;
}

int dejavu_get_threads(void) { return pool.threads; }

/* Tests: the least work (floats) a chunk gets (1: split even tiny products); the old value. */
int64_t dejavu_set_min_chunk(int64_t floats) {
  int64_t old = pool.min_chunk;
  if (floats >= 1) pool.min_chunk = floats;
  return old;
}

int64_t dejavu_struct_size(const char* name) {
#define SIZE_OF(type) if (!strcmp(name, #type)) return (int64_t)sizeof(type);
  SIZE_OF(llama_layer) SIZE_OF(opt_layer) SIZE_OF(mlp_weights) SIZE_OF(predictor_weights) SIZE_OF(teal_weights)
  SIZE_OF(layer_step) SIZE_OF(mlp_step)
#undef SIZE_OF
  return 0;
}

/* ------------------------------------------------------------------------------------------
   Row products. */
static int bad_index(const int64_t* idx, int64_t K, int64_t rows) {
  if (!idx) return K > rows;
  for (int64_t k = 0; k < K; k++) if (idx[k] < 0 || idx[k] >= rows) return 1;
  return 0;
}

static float dot(const float* w, const float* h, int64_t d) {
  v8 s = {0}; int64_t j = 0; float t = 0.f;
  for (; j + 8 <= d; j += 8) s += ld(w + j) * ld(h + j);
  for (; j < d; j++) t += w[j] * h[j];
  return hsum(s) + t;
}

/* Weights of any weight_type read as floats: wrow(w, i, t) the address of element i, ldw the
   eight elements from i, wat element i. The functions that read weights take t as an argument
   and are forced inline into a switch on the type (BY_WEIGHT_TYPE), so each type gets its own
   copy with t a constant: no branch in the loops, and float32's copy computes exactly what it
   did before there were types. */
#define INLINE static inline __attribute__((always_inline))
#define BY_WEIGHT_TYPE(t, call)                      \
  switch (t) {                                       \
    case WEIGHTS_BF16: { const int T_ = WEIGHTS_BF16; call; } break; \
    case WEIGHTS_F16: { const int T_ = WEIGHTS_F16; call; } break;   \
    default: { const int T_ = WEIGHTS_F32; call; } break;            \
  }
static inline int bad_weight_type(int64_t t) { return t < WEIGHTS_F32 || t > WEIGHTS_F16; }
INLINE const void* wrow(const void* w, int64_t i, int t) { return (const char*)w + i * (t == WEIGHTS_F32 ? 4 : 2); }
INLINE v8 ldw(const void* w, int64_t i, int t) {
  if (t == WEIGHTS_BF16) return ldbf((const uint16_t*)w + i);
  if (t == WEIGHTS_F16) return ldh((const uint16_t*)w + i);
  return ld((const float*)w + i);
}
INLINE float wat(const void* w, int64_t i, int t) {
  if (t == WEIGHTS_BF16) return bf16_float(((const uint16_t*)w)[i]);
  if (t == WEIGHTS_F16) return half_float(((const uint16_t*)w)[i]);
  return ((const float*)w)[i];
}

/* One row read front to back, four sums in flight. Consecutive rows are then one sequential
   stream, which the hardware prefetchers follow best: on an AMD EPYC (Zen 4) four rows read
   interleaved streamed 0.6x as fast on one core, and the dense MLP in the layer took 1.33x
   (float32) to 1.6x (bfloat16) as long. The gathered MLP's rows are scattered, so there four
   neurons' rows stream at once instead (dots_of_four). */
INLINE float dotw(const void* w, const float* h, int64_t d, int t) {
  v8 s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0}; int64_t j = 0; float r = 0.f;
  for (; j + 32 <= d; j += 32) {
    s0 += ldw(w, j, t) * ld(h + j); s1 += ldw(w, j + 8, t) * ld(h + j + 8);
    s2 += ldw(w, j + 16, t) * ld(h + j + 16); s3 += ldw(w, j + 24, t) * ld(h + j + 24);
  }
  for (; j + 8 <= d; j += 8) s0 += ldw(w, j, t) * ld(h + j);
  for (; j < d; j++) r += wat(w, j, t) * h[j];
  return hsum((s0 + s1) + (s2 + s3)) + r;
}

int dejavu_weight_paths(void) {
  int paths = 0;
#if defined(__AVX2__)
  paths |= 1;
#endif
#if defined(__F16C__)
  paths |= 2;
#endif
  return paths;
}

#define ACT_NONE 0
#define ACT_SILU_GLU 1
#define ACT_RELU 2
#define ACT_SILU 3
static inline float activate(int64_t act, float a, float b) {
  if (act == ACT_SILU_GLU) return a / (1.f + expf(-a)) * b;
  if (act == ACT_RELU) return a > 0.f ? a : 0.f;
  if (act == ACT_SILU) return a / (1.f + expf(-a));
  return a;
}

/* out[q] = r[q] . h for four rows, one after the other. */
INLINE void dot4(const void* r0, const void* r1, const void* r2, const void* r3, const float* h, int64_t d,
                 float* out, int t) {
  out[0] = dotw(r0, h, d, t); out[1] = dotw(r1, h, d, t); out[2] = dotw(r2, h, d, t); out[3] = dotw(r3, h, d, t);
}

/* Rows i = idx[k] (idx NULL: i = k, every row in order) of A [rows, d] (row stride lda) and
   B (row stride ldb; may be NULL) against h [d], each row read front to back (dotw):
     act 0: out[k] = A[i].h + bias_a[i]   (B NULL)
     act 1: out[k] = silu(A[i].h + bias_a[i]) * (B[i].h + bias_b[i])
     act 2: out[k] = relu(A[i].h + bias_a[i])
   Biases may be NULL. */
typedef struct {
  const void *A, *B;
  const float *bias_a, *bias_b, *h;
  const int64_t* idx;
  float* out;
  int64_t lda, ldb, d, act, weights;
} dots_job;

#define ROW(k) (idx ? idx[(k)] : (k))
#define BA(i) (bias_a ? bias_a[i] : 0.f)
#define BB(i) (bias_b ? bias_b[i] : 0.f)
/* Outputs [begin, end): groups of four rows (two of A and B) from `begin`, so a range whose
   begin is a multiple of four computes each row as the whole range does. */
INLINE void dots_rows(const dots_job* J, int64_t begin, int64_t end, int t) {
  const void *A = J->A, *B = J->B;
  const float *bias_a = J->bias_a, *bias_b = J->bias_b, *h = J->h;
  const int64_t* idx = J->idx;
  float* out = J->out;
  int64_t lda = J->lda, ldb = J->ldb, d = J->d, act = J->act, k = begin;
  float v[4];
  if (B) {  /* two neurons of A and B at a time */
    for (; k + 2 <= end; k += 2) {
      int64_t i0 = ROW(k), i1 = ROW(k + 1);
      dot4(wrow(A, i0 * lda, t), wrow(B, i0 * ldb, t), wrow(A, i1 * lda, t), wrow(B, i1 * ldb, t), h, d, v, t);
      float va0 = v[0] + BA(i0), vb0 = v[1] + BB(i0), va1 = v[2] + BA(i1), vb1 = v[3] + BB(i1);
      out[k] = activate(act, va0, vb0); out[k + 1] = activate(act, va1, vb1);
    }
    for (; k < end; k++) {
      int64_t i = ROW(k);
      float va = dotw(wrow(A, i * lda, t), h, d, t) + BA(i), vb = dotw(wrow(B, i * ldb, t), h, d, t) + BB(i);
      out[k] = activate(act, va, vb);
    }
    return;
  }
  for (; k + 4 <= end; k += 4) {
    int64_t i0 = ROW(k), i1 = ROW(k + 1), i2 = ROW(k + 2), i3 = ROW(k + 3);
    dot4(wrow(A, i0 * lda, t), wrow(A, i1 * lda, t), wrow(A, i2 * lda, t), wrow(A, i3 * lda, t), h, d, v, t);
    out[k] = activate(act, v[0] + BA(i0), 0.f);
    out[k + 1] = activate(act, v[1] + BA(i1), 0.f);
    out[k + 2] = activate(act, v[2] + BA(i2), 0.f);
    out[k + 3] = activate(act, v[3] + BA(i3), 0.f);
  }
  for (; k < end; k++) out[k] = activate(act, dotw(wrow(A, ROW(k) * lda, t), h, d, t) + BA(ROW(k)), 0.f);
}

static void dots_range(void* job, int64_t begin, int64_t end) {
  const dots_job* J = job;
  BY_WEIGHT_TYPE(J->weights, dots_rows(J, begin, end, T_))
}
#undef ROW
#undef BA
#undef BB

int dejavu_gathered_dots(const void* A, int64_t lda, const void* B, int64_t ldb, const float* bias_a,
                         const float* bias_b, const int64_t* idx, int64_t K, int64_t rows, int64_t d,
                         const float* h, float* out_a, int64_t act, weight_type weights) {
  if (bad_index(idx, K, rows) || bad_weight_type(weights)) return 1;
  dots_job job = {A, B, bias_a, bias_b, h, idx, out_a, lda, ldb, d, act, weights};
  parallel_for(K, 4, B ? 2 * d : d, dots_range, &job);
  return 0;
}

/* Up to three products against the same h in one parallel_for (q, k and v): part p's rows are
   items [start[p], start[p] + part[p] rows) of one range, each part starting at a multiple of
   four (the items between parts belong to none). */
typedef struct {
  dots_job part[3];
  int64_t start[3], rows[3], parts;
} gemvs_job;

static void gemvs_range(void* job, int64_t begin, int64_t end) {
  const gemvs_job* J = job;
  for (int64_t p = 0; p < J->parts; p++) {
    int64_t b = begin - J->start[p], e = end - J->start[p];
    if (b < 0) b = 0;
    if (e > J->rows[p]) e = J->rows[p];
    if (b < e) dots_range((void*)&J->part[p], b, e);
  }
}

static void gemvs(int64_t parts, const void* const* w, const float* const* bias, const int64_t* rows, int64_t d,
                  const float* h, float* const* out, int64_t weights) {
  gemvs_job job = {.parts = parts};
  int64_t items = 0;
  for (int64_t p = 0; p < parts; p++) {
    job.part[p] = (dots_job){w[p], 0, bias[p], 0, h, 0, out[p], d, 0, d, ACT_NONE, weights};
    job.start[p] = (items + 3) / 4 * 4;
    job.rows[p] = rows[p];
    items = job.start[p] + rows[p];
  }
  parallel_for(items, 4, d, gemvs_range, &job);
}

static void gemv(const void* w, const float* bias, int64_t rows, int64_t d, const float* h, float* out,
                 int64_t weights) {
  gemvs(1, &w, &bias, &rows, d, h, &out, weights);
}

/* The dense MLP for one token: out = output(act(first(h), second(h))), as in
   dejavu_gathered_mlp but over every neuron (A, B: [inner, d]; W: output [d, inner], row
   stride ldw). scratch: inner floats. */
int dejavu_dense_mlp(const void* A, int64_t lda, const void* B, int64_t ldb, const float* a_bias,
                     const float* b_bias, const void* W, int64_t ldw, const float* bias, int64_t inner, int64_t d,
                     const float* h, float* out, float* scratch, weight_type weights) {
  int status = dejavu_gathered_dots(A, lda, B, ldb, a_bias, b_bias, 0, inner, inner, d, h, scratch,
                                    B ? ACT_SILU_GLU : ACT_RELU, weights);
  if (!status) status = dejavu_gathered_dots(W, ldw, 0, 0, bias, 0, 0, d, d, inner, scratch, out, ACT_NONE, weights);
  return status;
}

/* ------------------------------------------------------------------------------------------
   One decoder layer for one token (layer_step, mlp_step). */
static void rms_norm(const float* x, const float* w, int64_t d, float eps, float* out) {
  double s = 0.0;
  for (int64_t j = 0; j < d; j++) s += (double)x[j] * x[j];
  float r = 1.f / sqrtf((float)(s / d) + eps);
  for (int64_t j = 0; j < d; j++) out[j] = w[j] * (x[j] * r);
}

/* x * cos + roll(x, half) * signed_sin (signed_sin = [-sin_lo, sin_hi]): Llama's RoPE */
static void rope(float* x, const float* cos, const float* ssin, int64_t hd) {
  int64_t half = hd / 2;
  for (int64_t j = 0; j < half; j++) {
    float lo = x[j], hi = x[j + half];
    x[j] = lo * cos[j] + hi * ssin[j];
    x[j + half] = hi * cos[j + half] + lo * ssin[j + half];
  }
}

/* The attention of one query token over cache positions 0..t (key_valid NULL: all; position
   t always): heads_out[h] = softmax(scale * q_h . K) V for each query head h, whose KV head
   is h / (heads / kv_heads). K, V: [kv_heads, capacity, hd], head_stride floats apart.
   The heads split over the threads; p: (t + 1) floats of scratch per head. */
typedef struct {
  const float *q, *k_cache, *v_cache;
  const uint8_t* key_valid;
  float *p, *heads_out, scale;
  int64_t head_stride, t, group, hd;
} attend_job;

typedef int32_t vi8 __attribute__((vector_size(32)));

/* e^x for eight x <= 0 (Cephes' expf: x = n ln 2 + r, a degree-6 polynomial in r; within 1 ulp
   of exp over [-87.3, 0] on a fine grid; x below -87.3, -inf included, gives 0). */
static inline v8 exp_nonpositive(v8 x) {
  vi8 live = x >= -87.3f;
  x = (v8)((vi8)x & live);                                   /* dead lanes computed as 0, zeroed below */
  v8 n = x * 1.44269504f - 0.5f;
  vi8 whole = __builtin_convertvector(n, vi8);               /* truncation: rounds x / ln 2 to nearest */
  n = __builtin_convertvector(whole, v8);
  v8 r = x - n * 0.693359375f + n * 2.12194440e-4f;
  v8 poly = r * 1.9875691500e-4f + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  v8 y = poly * r * r + r + 1.f;
  v8 scale = (v8)((whole + 127) << 23);
  return (v8)((vi8)(y * scale) & live);
}

/* Head h's scores p[i] = scale * q . K[i] (-inf where key i is masked), four keys at a time, each
   dot as dot() sums it. */
static void attention_scores(const attend_job* J, const float* qh, const float* keys, float* p) {
  int64_t n = J->t + 1, hd = J->hd, i = 0, hd8 = hd - hd % 8;
  for (; i + 4 <= n; i += 4) {
    const float *k0 = keys + i * hd, *k1 = k0 + hd, *k2 = k1 + hd, *k3 = k2 + hd;
    v8 s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
    for (int64_t j = 0; j < hd8; j += 8) {
      v8 q = ld(qh + j);
      s0 += ld(k0 + j) * q; s1 += ld(k1 + j) * q; s2 += ld(k2 + j) * q; s3 += ld(k3 + j) * q;
    }
    float tail[4] = {0.f, 0.f, 0.f, 0.f};
    for (int64_t j = hd8; j < hd; j++) {
      tail[0] += k0[j] * qh[j]; tail[1] += k1[j] * qh[j]; tail[2] += k2[j] * qh[j]; tail[3] += k3[j] * qh[j];
    }
    p[i] = J->scale * (hsum(s0) + tail[0]); p[i + 1] = J->scale * (hsum(s1) + tail[1]);
    p[i + 2] = J->scale * (hsum(s2) + tail[2]); p[i + 3] = J->scale * (hsum(s3) + tail[3]);
  }
  for (; i < n; i++) p[i] = J->scale * dot(keys + i * hd, qh, hd);
  if (J->key_valid)
    for (i = 0; i < n - 1; i++) if (!J->key_valid[i]) p[i] = -INFINITY;  /* position t is always valid */
}

/* p = softmax(p) in place, eight at a time. */
static void softmax(float* p, int64_t n) {
  float best = -INFINITY, total = 0.f;
  for (int64_t i = 0; i < n; i++) best = p[i] > best ? p[i] : best;
  v8 sums = {0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) { v8 e = exp_nonpositive(ld(p + i) - best); st(p + i, e); sums += e; }
  if (i < n) {  /* the rest through an eight-wide buffer: each score goes through the same steps */
    float rest[8] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY};
    memcpy(rest, p + i, sizeof(float) * (size_t)(n - i));
    v8 e = exp_nonpositive(ld(rest) - best);
    st(rest, e);
    sums += e;
    memcpy(p + i, rest, sizeof(float) * (size_t)(n - i));
  }
  total = hsum(sums);
  for (i = 0; i < n; i++) p[i] /= total;
}

/* out[0..hd) = sum_i p[i] V[i], 64 columns at a time in registers, then 8, then one. */
static void weighted_values(const float* p, const float* values, int64_t n, int64_t hd, float* out) {
  int64_t j = 0;
  for (; j + 64 <= hd; j += 64) {
    v8 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, a4 = {0}, a5 = {0}, a6 = {0}, a7 = {0};
    for (int64_t i = 0; i < n; i++) {
      const float* row = values + i * hd + j;
      v8 c = splat(p[i]);
      a0 += c * ld(row); a1 += c * ld(row + 8); a2 += c * ld(row + 16); a3 += c * ld(row + 24);
      a4 += c * ld(row + 32); a5 += c * ld(row + 40); a6 += c * ld(row + 48); a7 += c * ld(row + 56);
    }
    st(out + j, a0); st(out + j + 8, a1); st(out + j + 16, a2); st(out + j + 24, a3);
    st(out + j + 32, a4); st(out + j + 40, a5); st(out + j + 48, a6); st(out + j + 56, a7);
  }
  for (; j + 8 <= hd; j += 8) {
    v8 a = {0};
    for (int64_t i = 0; i < n; i++) a += splat(p[i]) * ld(values + i * hd + j);
    st(out + j, a);
  }
  for (; j < hd; j++) {
    float a = 0.f;
    for (int64_t i = 0; i < n; i++) a += p[i] * values[i * hd + j];
    out[j] = a;
  }
}

static void attend_range(void* job, int64_t begin, int64_t end) {
  const attend_job* J = job;
  int64_t n = J->t + 1, hd = J->hd;
  for (int64_t h = begin; h < end; h++) {
    const float* kv_keys = J->k_cache + (h / J->group) * J->head_stride;
    float* p = J->p + h * n;
    attention_scores(J, J->q + h * hd, kv_keys, p);
    softmax(p, n);
    weighted_values(p, J->v_cache + (h / J->group) * J->head_stride, n, hd, J->heads_out + h * hd);
  }
}

static void attend(const float* q, const float* k_cache, const float* v_cache, int64_t head_stride, int64_t t,
                   int64_t nh, int64_t nkv, int64_t hd, const uint8_t* key_valid, float scale, float* p,
                   float* heads_out) {
  attend_job job = {q, k_cache, v_cache, key_valid, p, heads_out, scale, head_stride, t, nh / nkv, hd};
  parallel_for(nh, 1, 2 * (t + 1) * hd, attend_range, &job);
}

static void write_cache(const float* k, const float* v, float* k_cache, float* v_cache, int64_t head_stride,
                        int64_t t, int64_t nkv, int64_t hd) {
  for (int64_t g = 0; g < nkv; g++) {
    memcpy(k_cache + g * head_stride + t * hd, k + g * hd, sizeof(float) * hd);
    memcpy(v_cache + g * head_stride + t * hd, v + g * hd, sizeof(float) * hd);
  }
}

/* Llama's attention half: x_out = x + attn(norm(x)), and xn = the MLP's input norm(x_out). */
static int llama_attention_half(const llama_layer* L, const layer_step* S, float* xn) {
  const float *x = S->x, *cos = S->cos, *ssin = S->signed_sin;
  float* x_out = S->x_out;
  int64_t d = L->hidden, hd = L->head_dim, nh = L->heads, nkv = L->kv_heads, t = S->t;
  if (nkv <= 0 || nh % nkv || hd % 2 || t < 0 || (t + 1) * hd > S->head_stride || !cos || !ssin) return 1;
  int64_t qd = nh * hd, kvd = nkv * hd;
  float* scratch = malloc(sizeof(float) * (size_t)(2 * qd + 2 * kvd + nh * (t + 1)));
  if (!scratch) return 2;
  float *q = scratch, *k = q + qd, *v = k + kvd, *heads = v + kvd, *p = heads + qd;
  rms_norm(x, L->attn_norm, d, L->attn_eps, xn);
  gemvs(3, (const void*[]){L->q, L->k, L->v}, (const float*[]){L->q_bias, L->k_bias, L->v_bias},
        (int64_t[]){qd, kvd, kvd}, d, xn, (float*[]){q, k, v}, L->weights);
  for (int64_t h = 0; h < nh; h++) rope(q + h * hd, cos, ssin, hd);
  for (int64_t g = 0; g < nkv; g++) rope(k + g * hd, cos, ssin, hd);
  write_cache(k, v, S->k_cache, S->v_cache, S->head_stride, t, nkv, hd);
  attend(q, S->k_cache, S->v_cache, S->head_stride, t, nh, nkv, hd, S->key_valid, S->scale, p, heads);
  gemv(L->o, L->o_bias, d, qd, heads, x_out, L->weights);
  for (int64_t j = 0; j < d; j++) x_out[j] += x[j];
  rms_norm(x_out, L->mlp_norm, d, L->mlp_eps, xn);
  free(scratch);
  return 0;
}

/* One OPT decoder layer for one token, its dense MLP only:
   pre-LN (norm_first): x += out(attn(LN1(x))); x += fc2(relu(fc1(LN2(x))))
   post-LN:             x = LN1(x + out(attn(x))); x = LN2(x + fc2(relu(fc1(x)))) */
static void layer_norm(const float* x, const float* w, const float* b, int64_t d, float eps, float* out) {
  double s = 0.0, s2 = 0.0;
  for (int64_t j = 0; j < d; j++) s += x[j];
  float mean = (float)(s / d);
  for (int64_t j = 0; j < d; j++) { double c = x[j] - mean; s2 += c * c; }
  float r = 1.f / sqrtf((float)(s2 / d) + eps);
  for (int64_t j = 0; j < d; j++) out[j] = (x[j] - mean) * r * (w ? w[j] : 1.f) + (b ? b[j] : 0.f);
}

int dejavu_opt_layer(const opt_layer* L, const mlp_step* M, const layer_step* S) {
  const float* x = S->x;
  float* x_out = S->x_out;
  int64_t d = L->hidden, hd = L->head_dim, nh = L->heads, inner = L->inner, t = S->t;
  if (M->kind != MLP_DENSE || nh * hd != d || t < 0 || (t + 1) * hd > S->head_stride || bad_weight_type(L->weights))
    return 1;
  float* scratch = malloc(sizeof(float) * (size_t)(6 * d + inner + nh * (t + 1)));
  if (!scratch) return 2;
  float *xn = scratch, *q = xn + d, *k = q + d, *v = k + d, *heads = v + d, *mlp_out = heads + d;
  float *act = mlp_out + d, *p = act + inner;
  const float* h = x;
  if (L->norm_first) { layer_norm(x, L->attn_norm, L->attn_norm_bias, d, L->attn_eps, xn); h = xn; }
  gemvs(3, (const void*[]){L->q, L->k, L->v}, (const float*[]){L->q_bias, L->k_bias, L->v_bias},
        (int64_t[]){d, d, d}, d, h, (float*[]){q, k, v}, L->weights);
  write_cache(k, v, S->k_cache, S->v_cache, S->head_stride, t, nh, hd);
  attend(q, S->k_cache, S->v_cache, S->head_stride, t, nh, nh, hd, S->key_valid, S->scale, p, heads);
  gemv(L->o, L->o_bias, d, d, heads, x_out, L->weights);
  for (int64_t j = 0; j < d; j++) x_out[j] += x[j];
  if (!L->norm_first) { layer_norm(x_out, L->attn_norm, L->attn_norm_bias, d, L->attn_eps, xn); memcpy(x_out, xn, sizeof(float) * d); }
  h = x_out;
  if (L->norm_first) { layer_norm(x_out, L->mlp_norm, L->mlp_norm_bias, d, L->mlp_eps, xn); h = xn; }
  dejavu_dense_mlp(L->fc1, d, 0, 0, L->fc1_bias, 0, L->fc2, inner, L->fc2_bias, inner, d, h, mlp_out, act, L->weights);
  for (int64_t j = 0; j < d; j++) x_out[j] += mlp_out[j];
  if (!L->norm_first) { layer_norm(x_out, L->mlp_norm, L->mlp_norm_bias, d, L->mlp_eps, xn); memcpy(x_out, xn, sizeof(float) * d); }
  free(scratch);
  return 0;
}
/* ------------------------------------------------------------------------------------------
   The sparse MLP of decoding. */
/* An order-preserving integer key of a score: a > b as floats iff key(a) > key(b). NaN ranks
   above +inf (as in torch.topk) and -0 ties with +0. */
static inline uint32_t order_key(float f) {
  if (f != f) return 0xffffffffu;
  f += 0.f;
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u & 0x80000000u ? ~u : u | 0x80000000u;
}

/* How many of keys[0..n) are at least v (AVX-512: per-lane counts of sixteen compares at a time,
   summed at the end). */
static int64_t count_at_least(const uint32_t* keys, int64_t n, uint32_t v) {
  int64_t count = 0, i = 0;
#if defined(__AVX512F__)
  __m512i p = _mm512_set1_epi32((int)v), one = _mm512_set1_epi32(1), c0 = _mm512_setzero_si512(), c1 = c0;
  for (; i + 32 <= n; i += 32) {
    c0 = _mm512_mask_add_epi32(c0, _mm512_cmpge_epu32_mask(_mm512_loadu_si512(keys + i), p), c0, one);
    c1 = _mm512_mask_add_epi32(c1, _mm512_cmpge_epu32_mask(_mm512_loadu_si512(keys + i + 16), p), c1, one);
  }
  count = _mm512_reduce_add_epi32(_mm512_add_epi32(c0, c1));
#endif
  for (; i < n; i++) count += keys[i] >= v;
  return count;
}

/* kept[0..K) = the indices of the K highest scores in index order; at the K-th value, ties go to
   the lowest indices (as topk + sort). The K-th highest key is found a bit at a time from the
   top: prefix | bit stays where at least K keys are at least that. The top 16 bits are searched
   over every key; then only the keys that share them (compressed into candidates) are counted,
   plus once those above them. Each step is a branch-free count (a radix select with 256-bucket
   histograms spent most of its time clearing and scanning them at these sizes). It is a serial
   step of each layer that the threads do not share. keys, candidates: n each; kept: K + 1. */
static void top_k_indices(const float* scores, int64_t n, int64_t K, uint32_t* keys, uint32_t* candidates,
                          int64_t* kept) {
  for (int64_t i = 0; i < n; i++) keys[i] = order_key(scores[i]);
  uint32_t prefix = 0;
  for (int bit = 31; bit >= 16; bit--)
    if (count_at_least(keys, n, prefix | 1u << bit) >= K) prefix |= 1u << bit;
  int64_t above = prefix >= 0xffff0000u ? 0 : count_at_least(keys, n, prefix + 0x10000u), size = 0, i = 0;
#if defined(__AVX512F__)
  for (__m512i m = _mm512_set1_epi32((int)0xffff0000u), p = _mm512_set1_epi32((int)prefix); i + 16 <= n; i += 16) {
    __m512i k = _mm512_loadu_si512(keys + i);
    __mmask16 in = _mm512_cmpeq_epi32_mask(_mm512_and_si512(k, m), p);
    int taken = __builtin_popcount(in);  /* compress in a register, then a masked store: Zen 4 microcodes
                                            a compress into memory (about 140 cycles) */
    _mm512_mask_storeu_epi32(candidates + size, (__mmask16)((1u << taken) - 1), _mm512_maskz_compress_epi32(in, k));
    size += taken;
  }
#endif
  for (; i < n; i++) { candidates[size] = keys[i]; size += (keys[i] & 0xffff0000u) == prefix; }
  for (int bit = 15; bit >= 0; bit--)
    if (above + count_at_least(candidates, size, prefix | 1u << bit) >= K) prefix |= 1u << bit;
  int64_t need = K - (prefix == 0xffffffffu ? 0 : count_at_least(keys, n, prefix + 1));
  /* The keys above prefix (the K-th highest) are kept, and `need` of those equal to it, lowest
     index first. */
  int64_t count = 0;
  i = 0;
#if defined(__AVX512F__)
  __m512i p = _mm512_set1_epi32((int)prefix), index = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
  for (; i + 16 <= n; i += 16) {
    __m512i k = _mm512_loadu_si512(keys + i);
    __mmask16 take = _mm512_cmpgt_epu32_mask(k, p), tie = _mm512_cmpeq_epu32_mask(k, p);
    for (; tie && need > 0; need--) { take |= tie & (__mmask16)-tie; tie &= tie - 1; }  /* lowest first */
    int low = __builtin_popcount(take & 0xff), high = __builtin_popcount(take >> 8);
    _mm512_mask_storeu_epi64(kept + count, (__mmask8)((1u << low) - 1), _mm512_maskz_compress_epi64((__mmask8)take, index));
    count += low;
    _mm512_mask_storeu_epi64(kept + count, (__mmask8)((1u << high) - 1),
                             _mm512_maskz_compress_epi64((__mmask8)(take >> 8), _mm512_add_epi64(index, _mm512_set1_epi64(8))));
    count += high;
    index = _mm512_add_epi64(index, _mm512_set1_epi64(16));
  }
#endif
  for (; i < n; i++) {
    int64_t tie = keys[i] == prefix && need > 0;
    need -= tie;
    kept[count] = i;
    count += keys[i] > prefix || tie;
  }
}



/* out[n] = W x, W [n, m] tiled as predictor_weights describes (float16 where half); tiles split
   over the threads. A range's tiles are split into four contiguous quarters read side by side:
   four long sequential streams keep more reads in flight than one, and four accumulators hide
   the multiply-add latency. Each tile's sums are the same wherever it falls. */
typedef struct {
  const void* W;
  const float* x;
  float* out;
  int64_t weights, n, m;
} tiled_job;

#define TILED_QUARTERS(type, load)                                                          \
  for (int64_t t = 0; t < quarter; t++) {                                                    \
    const type *w0 = (const type*)W + tile(t) * m * 8, *w1 = (const type*)W + tile(quarter + t) * m * 8, \
               *w2 = (const type*)W + tile(2 * quarter + t) * m * 8,                         \
               *w3 = (const type*)W + tile(3 * quarter + t) * m * 8;                         \
    v8 s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};                                               \
    for (int64_t j = 0; j < m; j++) {                                                        \
      v8 xj = {0}; xj += x[j];                                                               \
      s0 += load(w0 + 8 * j) * xj; s1 += load(w1 + 8 * j) * xj;                             \
      s2 += load(w2 + 8 * j) * xj; s3 += load(w3 + 8 * j) * xj;                             \
    }                                                                                        \
    v8 sums[4] = {s0, s1, s2, s3};                                                           \
    for (int64_t q = 0; q < 4; q++)                                                          \
      for (int64_t r = 0, row = tile(q * quarter + t) * 8; r < 8 && row + r < n && q * quarter + t < blocks; r++) \
        out[row + r] = sums[q][r];                                                           \
  }
static void tiled_range(void* job, int64_t begin, int64_t end) {
  const tiled_job* J = job;
  const void* W = J->W;
  const float* x = J->x;
  float* out = J->out;
  int64_t n = J->n, m = J->m, blocks = end - begin, quarter = (blocks + 3) / 4;
#define tile(b) (begin + ((b) < blocks ? (b) : blocks - 1))  /* past the end: reread the last tile, unused */
  if (J->weights == WEIGHTS_BF16) { TILED_QUARTERS(uint16_t, ldbf) }
  else if (J->weights == WEIGHTS_F16) { TILED_QUARTERS(uint16_t, ldh) }
  else { TILED_QUARTERS(float, ld) }
#undef tile
}
#undef TILED_QUARTERS

static void tiled_gemv(const void* W, int64_t weights, int64_t n, int64_t m, const float* x, float* out) {
  tiled_job job = {W, x, out, weights, n, m};
  parallel_for((n + 7) / 8, 1, 8 * m, tiled_range, &job);
}

/* The MLP on the kept neurons i = idx[k] only:
     out = bias + residual + sum_k act_k * T[i],  act_k = activation of (A[i].h + a_bias[i], B[i].h + b_bias[i]).
   With the packed layout (pack_mlp_neurons) a kept neuron's weights are one run of memory, so
   the kernel walks the kept neurons in order, four at a time: eight (or four) rows of A and B
   stream at once, then the four neurons' rows of T are added into the outputs. The neurons are
   cut into groups (sum_groups: a number that depends on K only), each summed into its own
   partial output, and out adds the partials in group order: the groups split over the threads
   with no two adding into the same outputs, and every output adds the same terms in the same
   order whatever the thread count. The groups split the neurons, not the output columns: a
   thread given columns would read a short run of every kept row of T. */
#define SUM_GROUPS 16  /* partial outputs of one call at most: more threads than this share groups */
#define MIN_GROUP 32   /* neurons per group at least: a small K makes fewer */

typedef struct {
  const mlp_weights* W;
  const int64_t* idx;
  const float *h, *residual;
  float *acts, *out;
  int64_t K;
} gathered_job;

/* A kept neuron's rows are a run of a few kilobytes after a gap, too short for the hardware
   prefetcher to ramp up on. So while four neurons stream, the row loops ask for the rows of the
   four neurons AHEAD places on, one cache line for each line they read, into L2 (locality 1:
   prefetcht2 on x86). On an AMD EPYC (Zen 4) one core then read a random half of the packed
   bfloat16 rows 2x as fast as when only the first lines of the next neurons were asked for, into
   L1: a prefetch into L1 holds one of its few miss buffers until its line comes. */
#define AHEAD 4   /* neurons */
#define STEP 32   /* elements of each row a pass of the row loops reads: one line of half precision, two of float32 */

INLINE void ask_for(const void* row, int64_t j, int t) {
  for (int64_t byte = 0; byte < STEP * (t == WEIGHTS_F32 ? 4 : 2); byte += 64)
    __builtin_prefetch((const char*)wrow(row, j, t) + byte, 0, 1);
}

/* sx[q] = x[q] . h, and with two (a constant where it is inlined) also sy[q] = y[q] . h, for four
   rows each: each row's sums eight columns at a time in order, while asking for the rows nx and
   ny (the neurons ahead). */
INLINE void dots_of_four(int two, const void* const* x, const void* const* y, const void* const* nx,
                         const void* const* ny, const float* h, int64_t d, float* sx, float* sy, int t) {
  v8 sa0 = {0}, sa1 = {0}, sa2 = {0}, sa3 = {0}, sb0 = {0}, sb1 = {0}, sb2 = {0}, sb3 = {0};
  float ta[4] = {0.f, 0.f, 0.f, 0.f}, tb[4] = {0.f, 0.f, 0.f, 0.f};
  int64_t j = 0, i;
  for (int64_t to; j + 8 <= d; j = to) {
    to = j + STEP <= d ? j + STEP : d - d % 8;
    if (to == j + STEP)
      for (int q = 0; q < 4; q++) {
        ask_for(nx[q], j, t);
        if (two) ask_for(ny[q], j, t);
      }
    for (i = j; i < to; i += 8) {
      v8 v = ld(h + i);
      sa0 += ldw(x[0], i, t) * v; sa1 += ldw(x[1], i, t) * v; sa2 += ldw(x[2], i, t) * v; sa3 += ldw(x[3], i, t) * v;
      if (two) {
        sb0 += ldw(y[0], i, t) * v; sb1 += ldw(y[1], i, t) * v; sb2 += ldw(y[2], i, t) * v; sb3 += ldw(y[3], i, t) * v;
      }
    }
  }
  for (; j < d; j++)
    for (int q = 0; q < 4; q++) {
      ta[q] += wat(x[q], j, t) * h[j];
      if (two) tb[q] += wat(y[q], j, t) * h[j];
    }
  v8 sa[4] = {sa0, sa1, sa2, sa3}, sb[4] = {sb0, sb1, sb2, sb3};
  for (int q = 0; q < 4; q++) {
    sx[q] = hsum(sa[q]) + ta[q];
    if (two) sy[q] = hsum(sb[q]) + tb[q];
  }
}

/* out[j] += sum_q w[q] * r[q][j] for j in [0, d), while asking for the rows nr. */
INLINE void add_four(const void* const* r, const void* const* nr, const float* w, int64_t d, float* out, int t) {
  v8 w0 = splat(w[0]), w1 = splat(w[1]), w2 = splat(w[2]), w3 = splat(w[3]);
  int64_t j = 0, i;
  for (int64_t to; j + 8 <= d; j = to) {
    to = j + STEP <= d ? j + STEP : d - d % 8;
    if (to == j + STEP)
      for (int q = 0; q < 4; q++) ask_for(nr[q], j, t);
    for (i = j; i < to; i += 8)
      st(out + i, ld(out + i) + w0 * ldw(r[0], i, t) + w1 * ldw(r[1], i, t) + w2 * ldw(r[2], i, t) + w3 * ldw(r[3], i, t));
  }
  for (; j < d; j++)
    out[j] += w[0] * wat(r[0], j, t) + w[1] * wat(r[1], j, t) + w[2] * wat(r[2], j, t) + w[3] * wat(r[3], j, t);
}

/* The groups K neurons are summed in (depends on K only), and group g's first neuron (a multiple of four). */
static int64_t sum_groups(int64_t K) {
  int64_t groups = K / MIN_GROUP;
  return groups < 1 ? 1 : groups > SUM_GROUPS ? SUM_GROUPS : groups;
}
static inline int64_t group_start(int64_t g, int64_t groups, int64_t K) {
  int64_t b = (K + 3) / 4 * g / groups * 4;
  return b < K ? b : K;
}

/* What sum_kept_rows adds for kept neuron i, with its rows read four neurons at a time:
   ACTS_COMPUTED  act(A[i].h + a_bias, B[i].h + b_bias) * T[i]   (the gathered MLP)
   ACTS_GIVEN     acts[k] * T[i]                                 (TEAL's down)
   ACTS_TIMES_B   acts[k] * (B[i].h + b_bias) * T[i]             (CATS: acts are silu(gate)) */
#define ACTS_COMPUTED 0
#define ACTS_GIVEN 1
#define ACTS_TIMES_B 2

typedef struct {
  const gathered_job* J;
  float* partial;  /* [groups, d] */
  int64_t groups;
  int mode;        /* ACTS_* */
} grouped_job;

/* The rows of A, B and T of the kept neurons idx[k + q], q < 4 (past `last`: the neuron at
   last - 1, so that asking for them costs a cache hit); a row mode does not read is NULL. */
typedef struct { const void *a[4], *b[4], *t[4]; } four_neurons;
INLINE four_neurons rows_of_four(const mlp_weights* W, const int64_t* idx, int64_t k, int64_t last, int mode, int t) {
  four_neurons r;
  for (int q = 0; q < 4; q++) {
    int64_t i = idx[k + q < last ? k + q : last - 1];
    r.a[q] = mode == ACTS_COMPUTED ? wrow(W->A, i * W->lda, t) : 0;
    r.b[q] = mode != ACTS_GIVEN && W->B ? wrow(W->B, i * W->ldb, t) : 0;
    r.t[q] = wrow(W->T, i * W->ldt, t);
  }
  return r;
}

/* Kept neurons [first, last) summed into part: four at a time (with the four after them asked
   for, up to `stop`, the end of what this thread reads), then any rest one by one. */
INLINE void sum_group(const grouped_job* G, int64_t first, int64_t last, int64_t stop, float* part, int t) {
  const gathered_job* J = G->J;
  const mlp_weights* W = J->W;
  const int64_t* idx = J->idx;
  const float* h = J->h;
  int64_t d = W->d, k = first, act = W->B ? ACT_SILU_GLU : ACT_RELU;
  float four[4], second[4] = {0.f, 0.f, 0.f, 0.f};
  for (; k + 4 <= last; k += 4) {
    four_neurons now = rows_of_four(W, idx, k, last, G->mode, t),
                 next = rows_of_four(W, idx, k + AHEAD, stop, G->mode, t);
    if (G->mode == ACTS_COMPUTED) {
      if (W->B) dots_of_four(1, now.a, now.b, next.a, next.b, h, d, four, second, t);
      else dots_of_four(0, now.a, 0, next.a, 0, h, d, four, 0, t);
      for (int q = 0; q < 4; q++) {
        int64_t i = idx[k + q];
        four[q] = activate(act, four[q] + (W->a_bias ? W->a_bias[i] : 0.f),
                           W->B ? second[q] + (W->b_bias ? W->b_bias[i] : 0.f) : 0.f);
      }
    } else if (G->mode == ACTS_TIMES_B) {
      dots_of_four(0, now.b, 0, next.b, 0, h, d, four, 0, t);
      for (int q = 0; q < 4; q++) four[q] = (four[q] + (W->b_bias ? W->b_bias[idx[k + q]] : 0.f)) * J->acts[k + q];
    } else {
      for (int q = 0; q < 4; q++) four[q] = J->acts[k + q];
    }
    add_four(now.t, next.t, four, d, part, t);
  }
  for (; k < last; k++) {  /* one by one: the rest of the last group */
    int64_t i = idx[k];
    float a = J->acts ? J->acts[k] : 0.f;
    if (G->mode == ACTS_COMPUTED)
      a = activate(act, dotw(wrow(W->A, i * W->lda, t), h, d, t) + (W->a_bias ? W->a_bias[i] : 0.f),
                   W->B ? dotw(wrow(W->B, i * W->ldb, t), h, d, t) + (W->b_bias ? W->b_bias[i] : 0.f) : 0.f);
    else if (G->mode == ACTS_TIMES_B)
      a *= dotw(wrow(W->B, i * W->ldb, t), h, d, t) + (W->b_bias ? W->b_bias[i] : 0.f);
    const void* r = wrow(W->T, i * W->ldt, t);
    v8 c = splat(a);
    int64_t j = 0;
    for (; j + 8 <= d; j += 8) st(part + j, ld(part + j) + c * ldw(r, j, t));
    for (; j < d; j++) part[j] += a * wat(r, j, t);
  }
}

/* Partial outputs of groups [begin, end). */
INLINE void sum_groups_of(const grouped_job* G, int64_t begin, int64_t end, int t) {
  const gathered_job* J = G->J;
  int64_t d = J->W->d, stop = group_start(end, G->groups, J->K);
  for (int64_t g = begin; g < end; g++) {
    float* part = G->partial + g * d;
    memset(part, 0, sizeof(float) * (size_t)d);
    sum_group(G, group_start(g, G->groups, J->K), group_start(g + 1, G->groups, J->K), stop, part, t);
  }
}

static void groups_range(void* job, int64_t begin, int64_t end) {
  const grouped_job* G = job;
  BY_WEIGHT_TYPE(G->J->W->weights, sum_groups_of(G, begin, end, T_))
}

/* out[j] = bias + residual + the partials in group order, for j in [begin, end). */
static void reduce_range(void* job, int64_t begin, int64_t end) {
  const grouped_job* G = job;
  const gathered_job* J = G->J;
  const float *bias = J->W->bias, *residual = J->residual;
  int64_t d = J->W->d, j = begin;
  for (; j + 8 <= end; j += 8) {  /* eight outputs at a time, each adding the same terms in the same order */
    v8 s = {0};
    s = (bias ? ld(bias + j) : s) + (residual ? ld(residual + j) : (v8){0});
    for (int64_t g = 0; g < G->groups; g++) s += ld(G->partial + g * d + j);
    st(J->out + j, s);
  }
  for (; j < end; j++) {
    float s = (bias ? bias[j] : 0.f) + (residual ? residual[j] : 0.f);
    for (int64_t g = 0; g < G->groups; g++) s += G->partial[g * d + j];
    J->out[j] = s;
  }
}

/* out = bias + residual + sum over the kept neurons as `mode` (ACTS_*) says: 0, or 2 where
   memory ran out. */
static int sum_kept_rows(const gathered_job* J, int mode) {
  int64_t d = J->W->d, K = J->K, groups = sum_groups(K);
  grouped_job G = {J, malloc(sizeof(float) * (size_t)(groups * d)), groups, mode};
  if (!G.partial) return 2;
  int64_t per_neuron = (mode == ACTS_GIVEN ? 1 : mode == ACTS_TIMES_B ? 2 : J->W->B ? 3 : 2) * d;
  parallel_for(groups, 1, (K + groups - 1) / groups * per_neuron, groups_range, &G);
  parallel_for(d, 16, groups, reduce_range, &G);
  free(G.partial);
  return 0;
}

static int gathered_mlp(const mlp_weights* W, const int64_t* idx, int64_t K, const float* h, const float* residual,
                        float* out) {
  if (bad_index(idx, K, W->rows) || bad_weight_type(W->weights)) return 1;
  gathered_job job = {W, idx, h, residual, 0, out, K};
  return sum_kept_rows(&job, ACTS_COMPUTED);
}

int dejavu_gathered_mlp(const mlp_weights* W, const int64_t* idx, int64_t K, const float* h, float* out) {
  return gathered_mlp(W, idx, K, h, 0, out);
}

/* DejaVu's predicted MLP for one token: the predictor scores the neurons from xp, the K
   highest are kept, in index order (ties: lowest index first; neurons, if given, receives
   them), then the gathered MLP on them: out = residual (NULL: 0) + mlp(h). */
int dejavu_predicted_mlp(const mlp_weights* W, const predictor_weights* P, const float* xp, int64_t K,
                         const float* h, const float* residual, float* out, int64_t* neurons) {
  int64_t inner = W->rows;
  if (K < 1 || K > inner || P->rows != inner || bad_weight_type(W->weights) || bad_weight_type(P->weights)) return 1;
  int64_t* kept = malloc(sizeof(int64_t) * (size_t)(K + 1) + sizeof(float) * (size_t)(P->rank + 3 * inner));
  if (!kept) return 2;
  float *low = (float*)(kept + K + 1), *scores = low + P->rank;
  uint32_t *keys = (uint32_t*)(scores + inner), *candidates = keys + inner;
  tiled_gemv(P->p1, P->weights, P->rank, P->d, xp, low);
  tiled_gemv(P->p2, P->weights, inner, P->rank, low, scores);
  top_k_indices(scores, inner, K, keys, candidates, kept);
  int status = gathered_mlp(W, kept, K, h, residual, out);
  if (!status && neurons) memcpy(neurons, kept, sizeof(int64_t) * (size_t)K);
  free(kept);
  return status;
}

/* ------------------------------------------------------------------------------------------
   The training-free sparse MLPs of one token (sparse_execution's teal and cats modes).

   CATS (Llama): gate is read in full and a_i = silu(gate_i . h + b_i); neuron i is dropped where
   |a_i| <= threshold; only the kept neurons' up rows and down columns (rows of T) are read:
     out = down_bias + sum_{kept i} a_i * (up_i . h + up_bias_i) * T_i.
   W is the MLP as the gathered kernels read it (packed: a neuron's gate, up and down one run).
   The activations are computed on the threads with the gate products, and each kept neuron's up
   and down rows are read in one pass, in the gathered MLP's groups (one stream per neuron).
   kept[0]: how many neurons were kept. */
static int cats_mlp(const mlp_weights* W, float threshold, const float* h, const float* residual, float* out,
                    int64_t* kept) {
  int64_t inner = W->rows, d = W->d, K = 0;
  if (!W->B || bad_weight_type(W->weights)) return 1;
  float* acts = malloc(sizeof(float) * (size_t)inner);
  int64_t* idx = malloc(sizeof(int64_t) * (size_t)(inner + 1));
  if (!acts || !idx) { free(acts); free(idx); return 2; }
  dots_job all = {W->A, 0, W->a_bias, 0, h, 0, acts, W->lda, 0, d, ACT_SILU, W->weights};  /* silu on the threads */
  parallel_for(inner, 4, d, dots_range, &all);
  for (int64_t i = 0; i < inner; i++) {
    float a = acts[i];
    if (fabsf(a) > threshold) { idx[K] = i; acts[K] = a; K++; }  /* acts[K <= i] is read already */
  }
  gathered_job sums = {W, idx, h, residual, acts, out, K};
  int status = sum_kept_rows(&sums, ACTS_TIMES_B);  /* each kept neuron's up and down rows in one pass */
  kept[0] = K;
  free(acts);
  free(idx);
  return status;
}

int dejavu_cats_mlp(const mlp_weights* W, float threshold, const float* h, float* out, int64_t* kept) {
  return cats_mlp(W, threshold, h, 0, out, kept);
}

/* TEAL (teal_mlp below; its weights: teal_weights): an entry j of h with |h_j| <= t_in is
   dropped, so only the kept entries' columns of gate and up (fc1) are read: one row of in_t
   each, [d rows of ld_in floats]: gate's column j at in_t + j * ld_in, up's at + up_offset
   (inner: right after it; 0: no up, OPT's ReLU MLP). Then
   act_i = silu(g_i) * u_i (relu(g_i)), and neuron i with |act_i| <= t_down is dropped from
   down: out = down_bias + sum_{kept i} act_i * down_t_i, down_t [inner rows of ld_down].
   kept[0], kept[1]: how many inputs and neurons were kept. */

/* TEAL's gate and up products from the kept inputs' columns: the kept inputs are cut into groups
   (teal_groups: a number that depends on their count only), each group summed into its own
   partial [parts * inner] while it streams its columns whole (gate's column j and up's, one
   run of the layout), four at a time; then each output adds the partials in group order (and
   the bias) and takes its activation, on the threads. Every output adds the same terms in the
   same order whatever the thread count. The groups split the inputs, not the outputs: a thread
   given outputs would read a short piece of every kept column. */
#define TEAL_GROUPS 8
#define TEAL_MIN_GROUP 4

typedef struct {
  const teal_weights* W;
  const int64_t* inputs;
  const float* h;
  float *partial, *act;
  int64_t count, groups, width;  /* width: the floats of one column pair (parts * inner) */
} teal_job;

static int64_t teal_groups(int64_t count) {
  int64_t groups = count / TEAL_MIN_GROUP;
  return groups < 1 ? 1 : groups > TEAL_GROUPS ? TEAL_GROUPS : groups;
}

INLINE void teal_columns(const teal_job* J, int64_t begin, int64_t end, int t) {
  const teal_weights* W = J->W;
  const float* h = J->h;
  int64_t width = J->width, stop = group_start(end, J->groups, J->count);
  for (int64_t g = begin; g < end; g++) {
    float* acc = J->partial + g * width;
    memset(acc, 0, sizeof(float) * (size_t)width);
    int64_t k = group_start(g, J->groups, J->count), last = group_start(g + 1, J->groups, J->count), i;
    for (; k + 4 <= last; k += 4) {  /* four columns, the four after them asked for (as sum_group) */
      const void *now[4], *next[4];
      float w[4];
      for (int q = 0; q < 4; q++) {
        int64_t ahead = k + AHEAD + q < stop ? k + AHEAD + q : stop - 1;
        now[q] = wrow(W->in_t, J->inputs[k + q] * W->ld_in, t);
        next[q] = wrow(W->in_t, J->inputs[ahead] * W->ld_in, t);
        w[q] = h[J->inputs[k + q]];
      }
      add_four(now, next, w, width, acc, t);
    }
    for (; k < last; k++) {
      const void* c = wrow(W->in_t, J->inputs[k] * W->ld_in, t);
      v8 w = splat(h[J->inputs[k]]);
      for (i = 0; i + 8 <= width; i += 8) st(acc + i, ld(acc + i) + w * ldw(c, i, t));
      for (; i < width; i++) acc[i] += w[0] * wat(c, i, t);
    }
  }
}

static void teal_columns_range(void* job, int64_t begin, int64_t end) {
  const teal_job* J = job;
  BY_WEIGHT_TYPE(J->W->weights, teal_columns(J, begin, end, T_))
}

/* act[i] for i in [begin, end): the partials in group order plus the bias, then the activation. */
static void teal_act_range(void* job, int64_t begin, int64_t end) {
  const teal_job* J = job;
  const teal_weights* W = J->W;
  int64_t inner = W->inner, i = begin;
  for (; i + 8 <= end; i += 8) {  /* the sums eight outputs at a time (the same terms in the same order) */
    v8 g = {0}, u = {0};
    if (W->gate_bias) g = ld(W->gate_bias + i);
    if (W->up_bias) u = ld(W->up_bias + i);
    for (int64_t p = 0; p < J->groups; p++) g += ld(J->partial + p * J->width + i);
    if (W->up_offset)
      for (int64_t p = 0; p < J->groups; p++) u += ld(J->partial + p * J->width + inner + i);
    for (int q = 0; q < 8; q++)
      J->act[i + q] = W->up_offset ? activate(ACT_SILU_GLU, g[q], u[q]) : activate(ACT_RELU, g[q], 0.f);
  }
  for (; i < end; i++) {
    float g = W->gate_bias ? W->gate_bias[i] : 0.f, u = W->up_bias ? W->up_bias[i] : 0.f;
    for (int64_t p = 0; p < J->groups; p++) g += J->partial[p * J->width + i];
    if (!W->up_offset) { J->act[i] = activate(ACT_RELU, g, 0.f); continue; }
    for (int64_t p = 0; p < J->groups; p++) u += J->partial[p * J->width + inner + i];
    J->act[i] = activate(ACT_SILU_GLU, g, u);
  }
}

static int teal_mlp(const teal_weights* W, float t_in, float t_down, const float* h, const float* residual,
                    float* out, int64_t* kept) {
  int64_t d = W->d, inner = W->inner, inputs = 0, K = 0;
  if ((W->up_offset && W->up_offset != inner) || bad_weight_type(W->weights)) return 1;  /* up's column right after gate's */
  int64_t width = (W->up_offset ? 2 : 1) * inner;
  int64_t* idx = malloc(sizeof(int64_t) * (size_t)(d + inner + 1));
  float* act = malloc(sizeof(float) * (size_t)(inner + TEAL_GROUPS * width));
  if (!idx || !act) { free(idx); free(act); return 2; }
  int64_t* neurons = idx + d;
  for (int64_t j = 0; j < d; j++) if (fabsf(h[j]) > t_in) idx[inputs++] = j;
  teal_job job = {W, idx, h, act + inner, act, inputs, teal_groups(inputs), width};
  parallel_for(job.groups, 1, (inputs + job.groups - 1) / job.groups * width, teal_columns_range, &job);
  parallel_for(inner, 16, job.groups * (width / inner) + 16, teal_act_range, &job);  /* + 16: the activation */
  for (int64_t i = 0; i < inner; i++) {
    float a = act[i];
    if (fabsf(a) > t_down) { neurons[K] = i; act[K] = a; K++; }  /* act[K <= i] is read already */
  }
  mlp_weights rows = {0};
  rows.T = W->down_t; rows.ldt = W->ld_down; rows.bias = W->down_bias; rows.d = d; rows.rows = inner;
  rows.weights = W->weights;
  gathered_job sums = {&rows, neurons, h, residual, act, out, K};
  int status = sum_kept_rows(&sums, ACTS_GIVEN);
  kept[0] = inputs;
  kept[1] = K;
  free(idx);
  free(act);
  return status;
}

int dejavu_teal_mlp(const teal_weights* W, float t_in, float t_down, const float* h, float* out, int64_t* kept) {
  return teal_mlp(W, t_in, t_down, h, 0, out, kept);
}

/* The MLP of a Llama layer after its attention half (x_out: x + attn; xn: norm(x_out)): adds its
   output into x_out. dense_scratch: d + inner floats (MLP_DENSE). */
static int llama_mlp(const llama_layer* L, const mlp_step* M, const layer_step* S, const float* xn,
                     float* dense_scratch) {
  int64_t d = L->hidden, inner = L->inner;
  float* x_out = S->x_out;
  switch (M->kind) {
    case MLP_NONE:
      if (M->mlp_input) memcpy(M->mlp_input, xn, sizeof(float) * (size_t)d);
      return 0;
    case MLP_DENSE: {
      /* into scratch, then added: the residual joins after the MLP's own sum, as in torch */
      float *mlp_out = dense_scratch, *act = mlp_out + d;
      int status = dejavu_dense_mlp(L->gate, d, L->up, d, L->gate_bias, L->up_bias, L->down, inner, L->down_bias,
                                    inner, d, xn, mlp_out, act, L->weights);
      for (int64_t j = 0; j < d; j++) x_out[j] += mlp_out[j];
      return status;
    }
    case MLP_PREDICTED:
      return dejavu_predicted_mlp(M->mlp, M->predictor, M->predict_from_input ? S->x : x_out, M->k, xn, x_out,
                                  x_out, 0);
    case MLP_TEAL:
      return teal_mlp(M->teal, M->t_in, M->t_down, xn, x_out, x_out, M->kept);
    case MLP_CATS:
      return cats_mlp(M->mlp, M->t_gate, xn, x_out, x_out, M->kept);
  }
  return 1;
}

/* Whether M names what its kind reads, at the layer's width: checked before the attention half
   writes the cache, so a refused call changes nothing. */
static int bad_mlp_step(const llama_layer* L, const mlp_step* M) {
  int64_t d = L->hidden;
  switch (M->kind) {
    case MLP_NONE:
      return 0;
    case MLP_DENSE:
      return !L->gate || !L->up || !L->down;
    case MLP_PREDICTED:
      return !M->mlp || !M->predictor || M->mlp->d != d || M->predictor->d != d || bad_weight_type(M->mlp->weights) ||
             bad_weight_type(M->predictor->weights);
    case MLP_TEAL:
      return !M->teal || !M->kept || M->teal->d != d || bad_weight_type(M->teal->weights);
    case MLP_CATS:
      return !M->mlp || !M->kept || M->mlp->d != d || bad_weight_type(M->mlp->weights);
  }
  return 1;
}

/* The attention half and the MLP in one call: no Python runs between them (it would run cold,
   its objects pushed out of the CPU's caches by the layer's weights). */
int dejavu_llama_layer(const llama_layer* L, const mlp_step* M, const layer_step* S) {
  if (bad_weight_type(L->weights) || bad_mlp_step(L, M)) return 1;
  int64_t d = L->hidden;
  float* scratch = malloc(sizeof(float) * (size_t)(M->kind == MLP_DENSE ? 2 * d + L->inner : d));
  if (!scratch) return 2;
  int status = llama_attention_half(L, S, scratch);
  if (!status) status = llama_mlp(L, M, S, scratch, scratch + d);
  free(scratch);
  return status;
}
