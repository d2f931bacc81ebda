// CommonJS consumer in TypeScript: `import = require` compiles to require('moe-ep').
import moeEp = require('moe-ep');

const t = moeEp.Tensor.full([3], 2, { device: 'cpu' });
console.log(`cjs ok: ${t.toNumbers().join(',')}`);
t.dispose();
