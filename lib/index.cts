/**
 * The CommonJS entry, `require('moe-ep')`: the package is ES modules, which Node ≥ 20.19 (and
 * ≥ 22.12) loads synchronously from require(); older versions are told to use import() instead.
 */
let moeEp: typeof import('./index.js');
try {
  moeEp = require('./index.js');
} catch (e) {
  if ((e as { code?: string }).code !== 'ERR_REQUIRE_ESM') throw e;
  throw new Error(
    `moe-ep: require('moe-ep') needs Node >= 20.19 or >= 22.12 (it loads ES modules); this is Node ${process.version}. Use import('moe-ep') or a newer Node.`,
    { cause: e },
  );
}
export = moeEp;
