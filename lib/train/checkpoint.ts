/**
 * Sharded checkpoints: one directory per step, one safetensors file per rank for its sharded state
 * (experts and their optimizer moments), one for the replicated state, and manifest.json — written
 * last — with the format version, step, layout, each file's size and SHA-256 and the file of every
 * tensor. Generic: it stores named tensors and knows nothing of a model class (lib/train/moe-state.ts
 * names the MoE layer's tensors).
 *
 *   <root>/step-00000042/  rank-0.safetensors … rank-{P-1}.safetensors, replicated.safetensors, manifest.json
 *   <root>/latest          "step-00000042\n"
 *
 * Atomic commit (save): every rank writes its file into <root>/.tmp-step-<N>-<nonce>/ and fsyncs it
 * and the folder; the ranks exchange what they wrote (a collective, which is also the barrier); rank 0
 * writes replicated.safetensors before the exchange and manifest.json after it, fsyncs, renames the
 * folder to <root>/step-<N>, fsyncs <root>, writes `latest` through a fresh temporary (fsync, rename),
 * and finally prunes old checkpoints (`keep`). A crash at any point leaves every committed checkpoint
 * findable: a step folder exists only once complete, and `latest` only names one. Saving a step that
 * exists moves the old folder to .old-step-<N>-<hex> first; until the new one has its name, readers
 * take that folder as step N and the next prune or save renames it back, so no crash loses it. Folders
 * being deleted are renamed .del-* first and are never read. All ranks must see <root> on one shared
 * filesystem.
 *
 * Load: every file goes through lib/train/safe-files.ts (plain names, containment after resolving
 * links, regular files only, size caps, bounded JSON). The manifest is validated field by field
 * (errors name the field); every file must exist with its recorded size; verify (default on) checks
 * the SHA-256 of every file it opens — one pass over its bytes — and a mismatch names the directory,
 * the file and, by per-tensor checksums, the damaged tensor. verifyAll() (and `moe-ep ckpt inspect`)
 * also checks each header against the manifest and every tensor's own SHA-256. Tensors are read by
 * name onto any device, so a different EP size reads just the experts it now owns. A root resolves
 * to the newest committed checkpoint that passes these checks (latestCheckpoint()).
 */
export { fsyncDir } from './safe-files.js';
export {
  CHECKPOINT_FORMAT,
  CHECKPOINT_FORMAT_VERSION,
  type CheckpointManifest,
  type EpLayout,
  LATEST_FILE,
  latestCheckpoint,
  listCheckpoints,
  MANIFEST_FILE,
  type ManifestExtras,
  type ManifestFile,
  type ManifestTensor,
  readManifest,
  REPLICATED_FILE,
  type SkippedCheckpoint,
  stepDirName,
} from './checkpoint-layout.js';
export {
  pruneCheckpoints,
  type RawTensor,
  saveCheckpoint,
  type SavedCheckpoint,
  type SaveOptions,
  writeCheckpoint,
} from './checkpoint-save.js';
export {
  CheckpointReader,
  type GetOptions,
  loadCheckpoint,
  type LoadOptions,
  locateCheckpoint,
  resolveCheckpointDir,
} from './checkpoint-load.js';
