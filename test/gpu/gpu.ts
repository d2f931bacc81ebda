// Shared by the GPU suite: whether a GPU is usable, and a hard failure when `npm run test:gpu`
// (MOE_EP_REQUIRE_GPU=1) runs where none is, so a GPU run can never pass by skipping everything.
import { cuda } from '../../lib/index.js';

export const hasGpu = cuda.isAvailable();
if (process.env['MOE_EP_REQUIRE_GPU'] && !hasGpu) {
  throw new Error(`MOE_EP_REQUIRE_GPU is set but no GPU is usable: ${cuda.unavailableReason()}`);
}
