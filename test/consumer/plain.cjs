// Plain JavaScript with require(); a misspelt option is refused at run time.
const { Tensor } = require('moe-ep');

const t = Tensor.zeros([2], { device: 'cpu' });
try {
  Tensor.zeros([2], { devise: 'cpu' });
  throw new Error('a misspelt option was accepted');
} catch (e) {
  if (!/unknown option 'devise' \(did you mean 'device'\?\)/.test(e.message)) throw e;
}
console.log(`require ok: ${t.toNumbers().join(',')}, misspelt option refused`);
t.dispose();
