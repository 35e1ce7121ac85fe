// trainer/viz.h — pictures for msa viz: the heat-map of selected key blocks (the paper
// appendix's picture) and metric curves read from the trainer's JSON-lines log. Torch-free
// (library msa_data); images are written with trainer/png.h.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace msa::viz {

struct Image {
  int64_t width = 0, height = 0;
  std::vector<uint8_t> rgb;  // [height][width][3], top row first

  Image() = default;
  Image(int64_t width, int64_t height, uint8_t r = 255, uint8_t g = 255, uint8_t b = 255);
  uint8_t* at(int64_t x, int64_t y) { return rgb.data() + 3 * (y * width + x); }
  const uint8_t* at(int64_t x, int64_t y) const { return rgb.data() + 3 * (y * width + x); }
  void write_png(const std::string& path) const;
};

// ---- Selection heat-map -------------------------------------------------------------------------
constexpr uint8_t kFutureGrey = 224;  // r = g = b of cells wholly in the causal future
struct HeatmapOptions {
  int64_t q_bin = 0;         // queries per row; 0 = bk (rows are query blocks, so the diagonal is 45°)
  int64_t kb_bin = 1;        // key blocks per column
  int64_t max_cells = 1024;  // rows and columns are coarsened (q_bin, kb_bin doubled) until both
                             // counts are <= this
  int64_t cell_px = 0;       // pixels per cell side; 0 = the largest that keeps the map <= 768 px
  bool legend = true;        // margins with a caption, axis ticks with block numbers and a colour
                             // bar (0..1) on the right; false = the cells only, cell (row, col) at
                             // pixels [col * cell_px, (col + 1) * cell_px) x [row * cell_px, ...)
};

// The key blocks selected by one KV head for each query of one sequence: x = key block (left =
// block 0, the sink), y = query (top = query 0), each cell shaded by the fraction of the row's
// queries that selected a key block of the column (white = none, dark blue = all). Cells wholly in
// the causal future of the row are light grey. The local block makes the diagonal, block 0 the sink
// column, and long-range choices vertical stripes.
//   topk_idx: [n_q, h_kv, topk], contiguous, block numbers (query i at position i sees blocks
//             0..i / bk), -1 padded, as msa::index_topk writes it.
//   group:    the KV head (GQA group) to draw, 0 <= group < h_kv.
// Throws msa::Error on a null pointer, non-positive sizes, group out of range, or an entry that is
// neither -1 nor a block the query can see (0..i / bk).
Image selection_heatmap(const int32_t* topk_idx, int64_t n_q, int64_t h_kv, int64_t topk, int64_t bk, int64_t group,
                        const HeatmapOptions& options = {});

// ---- Curves -------------------------------------------------------------------------------------
struct Series {
  std::string name;          // legend text (drawn upper-case in a 3x5 pixel font)
  std::string panel;         // series with the same panel share axes; empty = name
  std::vector<double> x, y;  // same length; x ascending (steps); NaN/inf y values are skipped
};

// Layout of curves(): panel p's plot area is x in [kCurveLeft, width - kCurveRight),
// y in [p * panel_height + kCurveTop, (p + 1) * panel_height - kCurveBottom); only the lines are
// drawn there in series colours (the legend swatches are above it, in the top margin).
constexpr int64_t kCurveLeft = 44, kCurveRight = 8, kCurveTop = 14, kCurveBottom = 14;

struct CurveOptions {
  int64_t width = 640;         // image width in pixels
  int64_t panel_height = 200;  // each panel's height in pixels
  bool log_y = false;          // log10 y axis (values <= 0 skipped)
};

// Line plots, one panel per distinct panel name (in first-appearance order), stacked vertically,
// sharing the x range; each panel has its own y range, tick labels for its min and max, and a
// legend. Series in one panel get distinct colours. Throws msa::Error when there is nothing to
// draw or x and y differ in length.
Image curves(const std::vector<Series>& series, const CurveOptions& options = {});

// Reads a metrics file of JSON lines, one object per log step ({"step": 100, "loss": 2.1, ...}),
// and returns one Series per key (x = "step", y = the key's value) for the lines that hold both as
// numbers. keys empty = every numeric key other than "step", in first-appearance order. A
// malformed last line (a run killed mid-write) is ignored; any other malformed line throws
// msa::Error naming the file and line.
std::vector<Series> read_metrics_jsonl(const std::string& path, const std::vector<std::string>& keys = {});

}  // namespace msa::viz
