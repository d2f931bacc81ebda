// ESLint finds mistakes; the layout of the code is prettier's (.prettierrc.json, npm run format).
// TypeScript: typescript-eslint's recommended rules, plus the promise rules that need type
// information (a promise neither awaited nor handled, an async function where a void callback is
// expected, await of a non-promise). JavaScript (.mjs: scripts, benchmarks, the MPI test programs):
// ESLint's recommended rules. An intentionally unused name starts with '_' (a `using` binding held
// only for its disposal, a field left out of a rest copy).
import js from '@eslint/js';
import { defineConfig, globalIgnores } from 'eslint/config';
import globals from 'globals';
import tseslint from 'typescript-eslint';

const unused = {
  argsIgnorePattern: '^_',
  varsIgnorePattern: '^_',
  caughtErrorsIgnorePattern: '^_',
  destructuredArrayIgnorePattern: '^_',
  ignoreRestSiblings: true,
};

export default defineConfig(
  globalIgnores(['dist/', 'build/', 'prebuilds/', 'benchmarks/results/', 'test/consumer/']),
  {
    linterOptions: { reportUnusedDisableDirectives: 'error' },
    languageOptions: { globals: globals.node },
  },
  js.configs.recommended,
  { rules: { 'no-unused-vars': ['error', unused] } },
  {
    files: ['**/*.ts', '**/*.cts', '**/*.mts'],
    extends: [tseslint.configs.recommended],
    languageOptions: {
      parserOptions: { project: './tsconfig.test.json', tsconfigRootDir: import.meta.dirname },
    },
    rules: {
      '@typescript-eslint/no-unused-vars': ['error', unused],
      '@typescript-eslint/no-floating-promises': 'error',
      '@typescript-eslint/no-misused-promises': 'error',
      '@typescript-eslint/await-thenable': 'error',
    },
  },
  {
    // The CommonJS entry is require() by design.
    files: ['**/*.cts'],
    rules: { '@typescript-eslint/no-require-imports': 'off' },
  },
);
