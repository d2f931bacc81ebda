// Types for expert-choice-reference.mjs (plain JavaScript, so that the MPI programs in test/mpi/ can
// import it too); the layout of each argument is described there.
type Values = ArrayLike<number>;

export interface ExpertChoiceReferenceInput {
  x: Values;
  dy: Values;
  router: Values;
  w13: Values;
  w2: Values;
  shared?: { w13: Values; w2: Values } | undefined;
  cfg: {
    H: number;
    F: number;
    E: number;
    Fs?: number | undefined;
    C: number;
    score?: 'softmax' | 'sigmoid' | undefined;
    routeScale?: number | undefined;
    zLossCoef?: number | undefined;
  };
}

export interface ExpertChoiceReferenceOutput {
  y: Float64Array;
  dx: Float64Array;
  dRouter: Float64Array;
  dW13: Float64Array;
  dW2: Float64Array;
  dShared13: Float64Array;
  dShared2: Float64Array;
  /** [T·E]: the token's place in the expert's chosen list, or -1. */
  slot: Int32Array;
  /** [E+1]: how many tokens were chosen by 0, 1, …, E experts. */
  expertsPerToken: number[];
  /** Over experts, the smallest relative gap between the C-th and (C+1)-th score. */
  minGap: number;
}

export function expertChoiceReference(input: ExpertChoiceReferenceInput): ExpertChoiceReferenceOutput;
