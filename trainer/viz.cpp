// trainer/viz.cpp — the selection heat-map, metric curves, a 3x5 pixel font for their labels and
// the JSON-lines metrics reader declared in viz.h.
#include "viz.h"

#include <msa/common.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>

#include "png.h"

namespace msa::viz {
namespace {

[[noreturn]] void fail(const std::string& fn, const std::string& msg) {
  throw msa::Error("msa::viz::" + fn + ": " + msg);
}

struct Rgb {
  uint8_t r, g, b;
};
constexpr Rgb kWhite{255, 255, 255}, kBlack{0, 0, 0}, kAxis{96, 96, 96}, kGrid{232, 232, 232};
constexpr Rgb kFuture{kFutureGrey, kFutureGrey, kFutureGrey};

void put(Image& im, int64_t x, int64_t y, Rgb c) {
  if (x < 0 || y < 0 || x >= im.width || y >= im.height) return;
  uint8_t* p = im.at(x, y);
  p[0] = c.r;
  p[1] = c.g;
  p[2] = c.b;
}

void fill(Image& im, int64_t x0, int64_t y0, int64_t w, int64_t h, Rgb c) {
  for (int64_t y = y0; y < y0 + h; ++y) {
    for (int64_t x = x0; x < x0 + w; ++x) put(im, x, y, c);
  }
}

// 3x5 glyphs, one row per entry, bit 2 = left column. Lower-case letters draw as upper-case.
struct Glyph {
  char c;
  uint8_t rows[5];
};
constexpr Glyph kFont[] = {
    {'0', {7, 5, 5, 5, 7}}, {'1', {2, 6, 2, 2, 7}}, {'2', {7, 1, 7, 4, 7}}, {'3', {7, 1, 7, 1, 7}},
    {'4', {5, 5, 7, 1, 1}}, {'5', {7, 4, 7, 1, 7}}, {'6', {7, 4, 7, 5, 7}}, {'7', {7, 1, 1, 2, 2}},
    {'8', {7, 5, 7, 5, 7}}, {'9', {7, 5, 7, 1, 7}}, {'A', {2, 5, 7, 5, 5}}, {'B', {6, 5, 6, 5, 6}},
    {'C', {3, 4, 4, 4, 3}}, {'D', {6, 5, 5, 5, 6}}, {'E', {7, 4, 6, 4, 7}}, {'F', {7, 4, 6, 4, 4}},
    {'G', {3, 4, 5, 5, 3}}, {'H', {5, 5, 7, 5, 5}}, {'I', {7, 2, 2, 2, 7}}, {'J', {1, 1, 1, 5, 2}},
    {'K', {5, 5, 6, 5, 5}}, {'L', {4, 4, 4, 4, 7}}, {'M', {5, 7, 7, 5, 5}}, {'N', {6, 5, 5, 5, 5}},
    {'O', {2, 5, 5, 5, 2}}, {'P', {6, 5, 6, 4, 4}}, {'Q', {2, 5, 5, 6, 3}}, {'R', {6, 5, 6, 5, 5}},
    {'S', {3, 4, 2, 1, 6}}, {'T', {7, 2, 2, 2, 2}}, {'U', {5, 5, 5, 5, 7}}, {'V', {5, 5, 5, 5, 2}},
    {'W', {5, 5, 7, 7, 5}}, {'X', {5, 5, 2, 5, 5}}, {'Y', {5, 5, 2, 2, 2}}, {'Z', {7, 1, 2, 4, 7}},
    {'.', {0, 0, 0, 0, 2}}, {'-', {0, 0, 7, 0, 0}}, {'+', {0, 2, 7, 2, 0}}, {'_', {0, 0, 0, 0, 7}},
    {':', {0, 2, 0, 2, 0}}, {'/', {1, 1, 2, 4, 4}}, {'=', {0, 7, 0, 7, 0}}, {'%', {5, 1, 2, 4, 5}},
    {'(', {1, 2, 2, 2, 1}}, {')', {4, 2, 2, 2, 4}}, {',', {0, 0, 0, 2, 4}}, {'?', {7, 1, 2, 0, 2}},
};
constexpr int64_t kGlyphW = 4, kGlyphH = 6;  // advance: 3 + 1 pixels, 5 + 1 rows

const Glyph* glyph(char c) {
  if (c >= 'a' && c <= 'z') c = static_cast<char>(c - 'a' + 'A');
  for (const Glyph& g : kFont) {
    if (g.c == c) return &g;
  }
  return c == ' ' ? nullptr : &kFont[std::size(kFont) - 1];  // unknown characters draw as '?'
}

int64_t text_width(const std::string& s) { return s.empty() ? 0 : static_cast<int64_t>(s.size()) * kGlyphW - 1; }

void text(Image& im, int64_t x, int64_t y, const std::string& s, Rgb c) {
  for (char ch : s) {
    if (const Glyph* g = glyph(ch)) {
      for (int r = 0; r < 5; ++r) {
        for (int b = 0; b < 3; ++b) {
          if (g->rows[r] & (4 >> b)) put(im, x + b, y + r, c);
        }
      }
    }
    x += kGlyphW;
  }
}

std::string number(double v) {
  char buf[32];
  if (v == 0) return "0";
  const double a = std::fabs(v);
  if (a >= 1e5 || a < 1e-3) {
    std::snprintf(buf, sizeof buf, "%.2e", v);
  } else if (a >= 100 && v == std::floor(v)) {
    std::snprintf(buf, sizeof buf, "%.0f", v);
  } else {
    std::snprintf(buf, sizeof buf, "%.4g", v);
  }
  return buf;
}

// A sequential white-to-navy scale; any nonzero fraction gets at least the first stop so that a
// single selection is visible.
Rgb shade(double f) {
  static const Rgb stops[] = {{198, 219, 239}, {107, 174, 214}, {33, 113, 181}, {8, 48, 107}};
  if (f <= 0) return kWhite;
  f = std::min(f, 1.0);
  const double t = f * 3;
  const int i = std::min(static_cast<int>(t), 2);
  const double u = t - i;
  auto lerp = [&](uint8_t a, uint8_t b) {
    return static_cast<uint8_t>(std::lround(a + (static_cast<double>(b) - a) * u));
  };
  return {lerp(stops[i].r, stops[i + 1].r), lerp(stops[i].g, stops[i + 1].g), lerp(stops[i].b, stops[i + 1].b)};
}

// Tick step (in cells) so that labels `label_px` apart fit: 1, 2, 5, 10, 20, 50, ...
int64_t tick_step(int64_t cell_px, int64_t label_px) {
  for (int64_t m = 1;; m *= 10) {
    for (int64_t s : {1, 2, 5}) {
      if (s * m * cell_px >= label_px) return s * m;
    }
  }
}

void line(Image& im, int64_t x0, int64_t y0, int64_t x1, int64_t y1, Rgb c) {
  const int64_t dx = std::abs(x1 - x0), dy = -std::abs(y1 - y0);
  const int64_t sx = x0 < x1 ? 1 : -1, sy = y0 < y1 ? 1 : -1;
  int64_t err = dx + dy;
  for (;;) {
    put(im, x0, y0, c);
    if (x0 == x1 && y0 == y1) break;
    const int64_t e2 = 2 * err;
    if (e2 >= dy) {
      err += dy;
      x0 += sx;
    }
    if (e2 <= dx) {
      err += dx;
      y0 += sy;
    }
  }
}

constexpr Rgb kPalette[] = {{31, 119, 180},  {255, 127, 14}, {44, 160, 44},   {214, 39, 40},
                            {148, 103, 189}, {140, 86, 75},  {227, 119, 194}, {23, 190, 207}};

}  // namespace

Image::Image(int64_t w, int64_t h, uint8_t r, uint8_t g, uint8_t b) : width(w), height(h) {
  if (w < 1 || h < 1) fail("Image", "size " + std::to_string(w) + " x " + std::to_string(h));
  rgb.resize(static_cast<size_t>(w * h * 3));
  for (size_t i = 0; i < rgb.size(); i += 3) {
    rgb[i] = r;
    rgb[i + 1] = g;
    rgb[i + 2] = b;
  }
}

void Image::write_png(const std::string& path) const { png::write(path, width, height, rgb.data()); }

// ---- Selection heat-map -------------------------------------------------------------------------
Image selection_heatmap(const int32_t* topk_idx, int64_t n_q, int64_t h_kv, int64_t topk, int64_t bk, int64_t group,
                        const HeatmapOptions& o) {
  const char* fn = "selection_heatmap";
  if (topk_idx == nullptr) fail(fn, "topk_idx is null");
  if (n_q < 1 || h_kv < 1 || topk < 1 || bk < 1) {
    fail(fn, "n_q = " + std::to_string(n_q) + ", h_kv = " + std::to_string(h_kv) + ", topk = " + std::to_string(topk) +
                 ", bk = " + std::to_string(bk) + ", expected each >= 1");
  }
  if (group < 0 || group >= h_kv) {
    fail(fn, "group = " + std::to_string(group) + ", expected 0 <= group < h_kv = " + std::to_string(h_kv));
  }
  if (o.q_bin < 0 || o.kb_bin < 1 || o.max_cells < 1 || o.cell_px < 0) {
    fail(fn, "options q_bin = " + std::to_string(o.q_bin) + ", kb_bin = " + std::to_string(o.kb_bin) +
                 ", max_cells = " + std::to_string(o.max_cells) + ", cell_px = " + std::to_string(o.cell_px) +
                 ", expected q_bin >= 0, kb_bin >= 1, max_cells >= 1, cell_px >= 0");
  }
  const int64_t n_kb = (n_q + bk - 1) / bk;
  int64_t q_bin = o.q_bin ? o.q_bin : bk, kb_bin = o.kb_bin;
  while ((n_q + q_bin - 1) / q_bin > o.max_cells) q_bin *= 2;
  while ((n_kb + kb_bin - 1) / kb_bin > o.max_cells) kb_bin *= 2;
  const int64_t rows = (n_q + q_bin - 1) / q_bin, cols = (n_kb + kb_bin - 1) / kb_bin;

  // count[row][col]: queries of the row that selected a block of the column (once per query).
  std::vector<int64_t> count(static_cast<size_t>(rows * cols), 0);
  std::vector<int64_t> stamp(static_cast<size_t>(cols), -1);
  for (int64_t i = 0; i < n_q; ++i) {
    const int32_t* sel = topk_idx + (i * h_kv + group) * topk;
    for (int64_t j = 0; j < topk; ++j) {
      const int64_t b = sel[j];
      if (b == -1) continue;
      if (b < 0 || b > i / bk) {
        fail(fn, "topk_idx[" + std::to_string(i) + ", " + std::to_string(group) + ", " + std::to_string(j) +
                     "] = " + std::to_string(b) + ", expected -1 or 0.." + std::to_string(i / bk) +
                     " (blocks visible to query " + std::to_string(i) + ")");
      }
      const int64_t c = b / kb_bin;
      if (stamp[static_cast<size_t>(c)] == i) continue;
      stamp[static_cast<size_t>(c)] = i;
      ++count[static_cast<size_t>((i / q_bin) * cols + c)];
    }
  }

  const int64_t cell = o.cell_px ? o.cell_px : std::clamp<int64_t>(768 / std::max(rows, cols), 1, 32);
  const int64_t pw = cols * cell, ph = rows * cell;
  // Margins: y labels (up to 6 digits) left, caption top, x labels bottom, colour bar right.
  const int64_t ml = o.legend ? 6 * kGlyphW + 6 : 0, mt = o.legend ? 2 * kGlyphH + 6 : 0;
  const int64_t mb = o.legend ? kGlyphH + 8 : 0, mr = o.legend ? 8 + 10 + 6 + 2 * kGlyphW + 4 : 0;
  Image im(ml + pw + mr, mt + ph + mb);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t q_first = r * q_bin, q_last = std::min(n_q, q_first + q_bin) - 1;
    const int64_t n_in = q_last - q_first + 1;
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t n = count[static_cast<size_t>(r * cols + c)];
      Rgb colour = shade(static_cast<double>(n) / static_cast<double>(n_in));
      if (n == 0 && c * kb_bin > q_last / bk) colour = kFuture;
      fill(im, ml + c * cell, mt + r * cell, cell, cell, colour);
    }
  }
  if (!o.legend) return im;

  char caption[160];
  std::snprintf(caption, sizeof caption, "KV HEAD %lld  N=%lld BK=%lld TOPK=%lld", (long long)group, (long long)n_q,
                (long long)bk, (long long)topk);
  text(im, ml, 2, caption, kBlack);
  std::snprintf(caption, sizeof caption, "Y: QUERY BLOCK (%lld Q/ROW)  X: KEY BLOCK (%lld/COL)", (long long)q_bin,
                (long long)kb_bin);
  text(im, ml, 2 + kGlyphH, caption, kAxis);
  // Frame and ticks; labels are block numbers (query rows in units of bk).
  for (int64_t x = ml - 1; x <= ml + pw; ++x) {
    put(im, x, mt - 1, kAxis);
    put(im, x, mt + ph, kAxis);
  }
  for (int64_t y = mt - 1; y <= mt + ph; ++y) {
    put(im, ml - 1, y, kAxis);
    put(im, ml + pw, y, kAxis);
  }
  const int64_t xs = tick_step(cell, 6 * kGlyphW);
  for (int64_t c = 0; c < cols; c += xs) {
    const int64_t x = ml + c * cell;
    put(im, x, mt + ph + 1, kAxis);
    put(im, x, mt + ph + 2, kAxis);
    text(im, x, mt + ph + 3, std::to_string(c * kb_bin), kBlack);
  }
  const int64_t ys = tick_step(cell, kGlyphH + 2);
  for (int64_t r = 0; r < rows; r += ys) {
    const int64_t y = mt + r * cell;
    put(im, ml - 2, y, kAxis);
    put(im, ml - 3, y, kAxis);
    const std::string label = number(static_cast<double>(r * q_bin) / static_cast<double>(bk));
    text(im, ml - 4 - text_width(label), y, label, kBlack);
  }
  // Colour bar: fraction of the row's queries selecting the column, 1 at the top.
  const int64_t bx = ml + pw + 8, bh = std::max<int64_t>(ph, 2);
  for (int64_t y = 0; y < bh; ++y) {
    fill(im, bx, mt + y, 10, 1, shade(1.0 - static_cast<double>(y) / static_cast<double>(bh - 1)));
  }
  text(im, bx + 13, mt, "1", kBlack);
  text(im, bx + 13, mt + bh - 5, "0", kBlack);
  return im;
}

// ---- Curves -------------------------------------------------------------------------------------
Image curves(const std::vector<Series>& series, const CurveOptions& o) {
  const char* fn = "curves";
  if (o.width < kCurveLeft + kCurveRight + 16 || o.panel_height < kCurveTop + kCurveBottom + 16) {
    fail(fn, "width = " + std::to_string(o.width) + ", panel_height = " + std::to_string(o.panel_height) +
                 ", expected >= " + std::to_string(kCurveLeft + kCurveRight + 16) +
                 " and >= " + std::to_string(kCurveTop + kCurveBottom + 16));
  }
  auto usable = [&](double y) { return std::isfinite(y) && (!o.log_y || y > 0); };
  std::vector<std::string> panels;
  std::vector<int> panel_of(series.size());
  double x_lo = std::numeric_limits<double>::infinity(), x_hi = -x_lo;
  for (size_t i = 0; i < series.size(); ++i) {
    const Series& s = series[i];
    if (s.x.size() != s.y.size()) {
      fail(fn, "series '" + s.name + "' has " + std::to_string(s.x.size()) + " x and " + std::to_string(s.y.size()) +
                   " y values");
    }
    const std::string p = s.panel.empty() ? s.name : s.panel;
    auto it = std::find(panels.begin(), panels.end(), p);
    panel_of[i] = static_cast<int>(it - panels.begin());
    if (it == panels.end()) panels.push_back(p);
    for (size_t k = 0; k < s.x.size(); ++k) {
      if (usable(s.y[k]) && std::isfinite(s.x[k])) {
        x_lo = std::min(x_lo, s.x[k]);
        x_hi = std::max(x_hi, s.x[k]);
      }
    }
  }
  if (!(x_lo <= x_hi)) fail(fn, "no finite points to draw");
  if (x_lo == x_hi) {
    x_lo -= 0.5;
    x_hi += 0.5;
  }
  const int64_t n_panels = static_cast<int64_t>(panels.size());
  Image im(o.width, n_panels * o.panel_height);
  const int64_t pw = o.width - kCurveLeft - kCurveRight;
  const int64_t ph = o.panel_height - kCurveTop - kCurveBottom;
  auto to_x = [&](double x) {
    return kCurveLeft + std::llround((x - x_lo) / (x_hi - x_lo) * static_cast<double>(pw - 1));
  };
  for (int64_t p = 0; p < n_panels; ++p) {
    const int64_t top = p * o.panel_height + kCurveTop;
    double y_lo = std::numeric_limits<double>::infinity(), y_hi = -y_lo;
    for (size_t i = 0; i < series.size(); ++i) {
      if (panel_of[i] != p) continue;
      for (size_t k = 0; k < series[i].y.size(); ++k) {
        const double y = series[i].y[k];
        if (!usable(y) || !std::isfinite(series[i].x[k])) continue;
        const double v = o.log_y ? std::log10(y) : y;
        y_lo = std::min(y_lo, v);
        y_hi = std::max(y_hi, v);
      }
    }
    if (!(y_lo <= y_hi)) {
      text(im, kCurveLeft, top + ph / 2, "NO DATA", kAxis);
      continue;
    }
    if (y_lo == y_hi) {
      const double d = std::max(std::fabs(y_lo) * 0.1, 0.5);
      y_lo -= d;
      y_hi += d;
    }
    auto to_y = [&](double y) {
      const double v = o.log_y ? std::log10(y) : y;
      return top + ph - 1 - std::llround((v - y_lo) / (y_hi - y_lo) * static_cast<double>(ph - 1));
    };
    // Grid at quarter heights, frame, y labels (min, mid, max) in data units.
    for (int q = 1; q < 4; ++q) {
      const int64_t y = top + (ph - 1) * q / 4;
      for (int64_t x = kCurveLeft; x < kCurveLeft + pw; ++x) put(im, x, y, kGrid);
    }
    for (int64_t x = kCurveLeft - 1; x <= kCurveLeft + pw; ++x) {
      put(im, x, top - 1, kAxis);
      put(im, x, top + ph, kAxis);
    }
    for (int64_t y = top - 1; y <= top + ph; ++y) {
      put(im, kCurveLeft - 1, y, kAxis);
      put(im, kCurveLeft + pw, y, kAxis);
    }
    for (int q = 0; q <= 2; ++q) {
      const double v = y_lo + (y_hi - y_lo) * q / 2;
      const std::string label = number(o.log_y ? std::pow(10.0, v) : v);
      const int64_t y = top + ph - 1 - (ph - 1) * q / 2;
      text(im, kCurveLeft - 3 - text_width(label), std::clamp<int64_t>(y - 2, top, top + ph - 5), label, kBlack);
    }
    const std::string xl = number(x_lo), xh = number(x_hi);
    text(im, kCurveLeft, top + ph + 3, xl, kBlack);
    text(im, kCurveLeft + pw - text_width(xh), top + ph + 3, xh, kBlack);
    text(im, kCurveLeft + (pw - text_width("STEP")) / 2, top + ph + 3, "STEP", kAxis);
    // Legend in the top margin: panel title, then a swatch and name per series.
    int64_t lx = kCurveLeft;
    text(im, lx, top - 10, panels[static_cast<size_t>(p)] + (o.log_y ? " (LOG)" : ""), kBlack);
    lx += text_width(panels[static_cast<size_t>(p)] + (o.log_y ? " (LOG)" : "")) + 10;
    int colour = 0;
    for (size_t i = 0; i < series.size(); ++i) {
      if (panel_of[i] != p) continue;
      const Rgb c = kPalette[colour++ % std::size(kPalette)];
      fill(im, lx, top - 9, 5, 3, c);
      if (series[i].name != panels[static_cast<size_t>(p)]) {
        text(im, lx + 7, top - 10, series[i].name, kAxis);
        lx += text_width(series[i].name) + 7;
      }
      lx += 10;
      // The line, skipping unusable points (a gap joins its neighbours).
      bool have = false;
      int64_t px = 0, py = 0;
      for (size_t k = 0; k < series[i].x.size(); ++k) {
        const double y = series[i].y[k];
        if (!usable(y) || !std::isfinite(series[i].x[k])) continue;
        const int64_t x1 = to_x(series[i].x[k]), y1 = to_y(y);
        if (have) {
          line(im, px, py, x1, y1, c);
        } else {
          put(im, x1, y1, c);
        }
        px = x1;
        py = y1;
        have = true;
      }
    }
  }
  return im;
}

std::vector<Series> read_metrics_jsonl(const std::string& path, const std::vector<std::string>& keys) {
  const char* fn = "read_metrics_jsonl";
  std::ifstream f(path);
  if (!f) fail(fn, "cannot open '" + path + "'");
  std::vector<std::string> lines;
  for (std::string l; std::getline(f, l);) lines.push_back(l);
  size_t last = lines.size();
  while (last > 0 && lines[last - 1].find_first_not_of(" \t\r") == std::string::npos) --last;

  std::vector<Series> out;
  for (const std::string& k : keys) out.push_back({k, "", {}, {}});
  auto slot = [&](const std::string& k) -> Series* {
    for (Series& s : out) {
      if (s.name == k) return &s;
    }
    if (!keys.empty()) return nullptr;
    out.push_back({k, "", {}, {}});
    return &out.back();
  };
  for (size_t i = 0; i < last; ++i) {
    if (lines[i].find_first_not_of(" \t\r") == std::string::npos) continue;
    nlohmann::ordered_json j;
    try {
      j = nlohmann::ordered_json::parse(lines[i]);
    } catch (const nlohmann::json::exception& e) {
      if (i + 1 == last) break;  // a run killed mid-write leaves a partial last line
      fail(fn, path + ":" + std::to_string(i + 1) + ": not JSON (" + e.what() + ")");
    }
    if (!j.is_object()) {
      fail(fn, path + ":" + std::to_string(i + 1) + ": expected a JSON object per line");
    }
    auto step = j.find("step");
    if (step == j.end() || !step->is_number()) continue;
    const double x = step->get<double>();
    for (auto it = j.begin(); it != j.end(); ++it) {
      if (it.key() == "step" || !it.value().is_number()) continue;
      if (Series* s = slot(it.key())) {
        s->x.push_back(x);
        s->y.push_back(it.value().get<double>());
      }
    }
  }
  return out;
}

}  // namespace msa::viz
