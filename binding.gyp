# No sources here: node-gyp (npm's default install, node-gyp-build's fallback, prebuildify) hands the
# build over to CMakeLists.txt through scripts/build-addon.mjs, so there is one list of sources.
{
  "targets": [
    {
      "target_name": "moe_ep",
      "type": "none",
      "actions": [
        {
          "action_name": "cmake_build",
          "inputs": ["CMakeLists.txt"],
          "outputs": ["<(PRODUCT_DIR)/moe_ep.node"],
          "action": ["node", "scripts/build-addon.mjs", "--out", "<(PRODUCT_DIR)"]
        }
      ]
    }
  ]
}
