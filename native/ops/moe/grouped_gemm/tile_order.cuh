// The order in which the Hopper grouped GEMM (hopper.cu) walks its output tiles, and what a tile
// covers. One definition for it and the ladder's ping-pong kernel (benchmarks/kernels/grouped_gemm/
// hopper_pingpong.cuh), so that they agree on the order their benchmarks compare. CUDA headers only
// (the ladder programs include it too).
#pragma once
#include <cstdint>

namespace moe::ops::sm90 {

struct Tile {
  int group, row0, row_end, col0;
  int k_begin, k_end, k_tiles;  // the inner range: NN/NT all of it; TN the group's rows
  int64_t out_base;             // TN: the group's [rows, cols] block of out
};

// Work item t of a launch of BM×BN tiles (k in steps of BK). P: the kernel's parameters, which
// name offsets [E+1], tile_start [E+1] (NN/NT: the prefix of each group's m-tiles), M, E, rows,
// cols, inner, n_tiles and tn_m_tiles alike.
// NN/NT: a band of GROUP_M m-tiles (over all groups, in order) sweeps every n-tile, so the weight
// columns a band needs stay in L2 while its m-tiles use them.
// TN: group-major, so the blocks in flight share one group's rows of a and b.
template <bool TN, int BM, int BN, int BK, int GROUP_M, typename P>
__device__ __forceinline__ Tile tile_in_order(const P& p, int t, int m_tiles) {
  Tile tile;
  if constexpr (TN) {
    const int per_group = p.tn_m_tiles * p.n_tiles;
    tile.group = t / per_group;
    tile.row0 = ((t % per_group) / p.n_tiles) * BM;
    tile.col0 = (t % p.n_tiles) * BN;
    tile.row_end = p.rows;
    tile.k_begin = min(max(__ldg(p.offsets + tile.group), 0), p.M);
    tile.k_end = min(max(__ldg(p.offsets + tile.group + 1), tile.k_begin), p.M);
    tile.out_base = int64_t(tile.group) * p.rows * p.cols;
  } else {
    const int per_band = GROUP_M * p.n_tiles;
    const int band_m = (t / per_band) * GROUP_M, band_rows = min(m_tiles - band_m, GROUP_M);
    const int m = band_m + (t % per_band) % band_rows;
    tile.col0 = ((t % per_band) / band_rows) * BN;
    int lo = 0, hi = p.E - 1;  // the group owning m-tile m: the last e with tile_start[e] <= m
    while (lo < hi) {
      const int mid = (lo + hi + 1) >> 1;
      if (__ldg(p.tile_start + mid) <= m) lo = mid;
      else hi = mid - 1;
    }
    tile.group = lo;
    const int begin = min(max(__ldg(p.offsets + lo), 0), p.M);
    tile.row_end = min(max(__ldg(p.offsets + lo + 1), begin), p.M);
    tile.row0 = begin + (m - __ldg(p.tile_start + lo)) * BM;
    tile.k_begin = 0;
    tile.k_end = p.inner;
    tile.out_base = 0;
  }
  tile.k_tiles = (tile.k_end - tile.k_begin + BK - 1) / BK;
  return tile;
}

}  // namespace moe::ops::sm90
