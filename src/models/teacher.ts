/**
 * What a teacher is to the rest of distill: the frozen model whose outputs the student learns
 * (the SDXL text encoders in `sdxl_teacher.ts`; tests use fakes). The target cache
 * (src/data/target_cache.ts) runs one over a caption set and records its identity.
 */

/** A value of a teacher's tokenizer settings, as a manifest records it. */
export type JsonScalar = string | number | boolean;

/** What computes targets. The CLI gets one from `loadSdxlTeacher`; tests use a fake. */
export interface Teacher {
  /**
   * What makes two teachers' outputs interchangeable (e.g. SHA-256 of each weight file's header
   * and size, model folder names); a cache refuses a teacher whose identity differs.
   */
  identity: Record<string, string>;
  /** Tokenizer settings the targets depend on (max length, pad ids, text normalisation). */
  tokenizer: Record<string, JsonScalar>;
  /** Tokens per sequence target (77 for SDXL). */
  seqLen: number;
  /** Features per token (2048 for SDXL: 768 + 1280). */
  seqDim: number;
  /** Features of the pooled target (1280 for SDXL). */
  pooledDim: number;
  /** Row-major f32 targets of a batch: seq [B, seqLen, seqDim], pooled [B, pooledDim]. */
  encode(captions: string[]): Promise<{ seq: Float32Array; pooled: Float32Array }>;
}
