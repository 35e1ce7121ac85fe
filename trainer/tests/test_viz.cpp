// trainer/tests/test_viz.cpp — tests of the PNG writer/reader (png.h), the selection heat-map,
// the curves and the metrics reader (viz.h), by pixels and by parsing the written files back.
#include <gtest/gtest.h>
#include <msa/common.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <set>

#include "png.h"
#include "viz.h"

namespace fs = std::filesystem;
using namespace msa;

namespace {

template <class F>
void expect_error(F f, const std::string& needle1, const std::string& needle2) {
  try {
    f();
    ADD_FAILURE() << "no msa::Error thrown (expected one naming " << needle1 << ")";
  } catch (const msa::Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find(needle1), std::string::npos) << m;
    EXPECT_NE(m.find(needle2), std::string::npos) << m;
  }
}

fs::path temp_path(const std::string& name) {
  return fs::temp_directory_path() / ("msa_test_viz_" + std::to_string(std::random_device{}()) + "_" + name);
}

std::vector<uint8_t> random_rgb(int64_t w, int64_t h, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<uint8_t> v(static_cast<size_t>(w * h * 3));
  for (auto& b : v) b = static_cast<uint8_t>(rng());
  return v;
}

uint32_t be32(const std::vector<uint8_t>& f, size_t p) {
  return (uint32_t{f[p]} << 24) | (uint32_t{f[p + 1]} << 16) | (uint32_t{f[p + 2]} << 8) | f[p + 3];
}

}  // namespace

TEST(Png, ChecksumsMatchKnownValues) {
  const std::string s = "123456789";
  const auto* p = reinterpret_cast<const uint8_t*>(s.data());
  EXPECT_EQ(png::crc32(p, s.size()), 0xCBF43926u);  // the CRC-32 check value
  EXPECT_EQ(png::crc32(p + 4, s.size() - 4, png::crc32(p, 4)), 0xCBF43926u);
  const std::string w = "Wikipedia";
  EXPECT_EQ(png::adler32(reinterpret_cast<const uint8_t*>(w.data()), w.size()), 0x11E60398u);
  // Long input: Adler-32 of 100000 bytes of 0xff against the definition computed in 64 bits.
  std::vector<uint8_t> ff(100000, 0xff);
  uint64_t a = 1, b = 0;
  for (uint8_t x : ff) {
    a = (a + x) % 65521;
    b = (b + a) % 65521;
  }
  EXPECT_EQ(png::adler32(ff.data(), ff.size()), static_cast<uint32_t>((b << 16) | a));
  EXPECT_EQ(png::adler32(ff.data() + 777, ff.size() - 777, png::adler32(ff.data(), 777)),
            static_cast<uint32_t>((b << 16) | a));
}

TEST(Png, EncodeDecodeRoundTrip) {
  // 1x1, odd sizes, and one spanning several stored blocks (300 * 3 + 1 = 901 bytes a row,
  // 211 rows = 190111 bytes > 2 * 65535).
  for (auto [w, h] : std::vector<std::pair<int64_t, int64_t>>{{1, 1}, {127, 3}, {129, 67}, {300, 211}}) {
    const auto rgb = random_rgb(w, h, static_cast<uint64_t>(w * 1000 + h));
    const auto file = png::encode(w, h, rgb.data());
    // Signature, then IHDR with the size, 8-bit RGB.
    ASSERT_EQ(std::memcmp(file.data(), "\x89PNG\r\n\x1a\n", 8), 0);
    EXPECT_EQ(be32(file, 8), 13u);
    EXPECT_EQ(std::string(file.begin() + 12, file.begin() + 16), "IHDR");
    EXPECT_EQ(be32(file, 16), static_cast<uint32_t>(w));
    EXPECT_EQ(be32(file, 20), static_cast<uint32_t>(h));
    EXPECT_EQ(file[24], 8);
    EXPECT_EQ(file[25], 2);
    EXPECT_EQ(std::string(file.end() - 8, file.end() - 4), "IEND");
    const auto d = png::decode(file);
    EXPECT_EQ(d.width, w);
    EXPECT_EQ(d.height, h);
    EXPECT_EQ(d.rgb, rgb);
  }
}

TEST(Png, CorruptionIsDetected) {
  const auto rgb = random_rgb(40, 30, 3);
  const auto good = png::encode(40, 30, rgb.data());
  auto bad = good;
  bad[60] ^= 0x10;  // inside IDAT: its CRC no longer matches
  expect_error([&] { png::decode(bad); }, "decode", "CRC");
  bad = good;
  bad[1] = 'Q';
  expect_error([&] { png::decode(bad); }, "decode", "signature");
  bad.assign(good.begin(), good.begin() + 50);
  expect_error([&] { png::decode(bad); }, "decode", "overruns");
  expect_error([&] { png::encode(0, 5, rgb.data()); }, "encode", "0 x 5");
  expect_error([&] { png::encode(5, 5, nullptr); }, "encode", "rgb is null");
}

TEST(Png, WriteAndReadFile) {
  const auto rgb = random_rgb(33, 17, 4);
  const fs::path p = temp_path("rw.png");
  png::write(p.string(), 33, 17, rgb.data());
  const auto d = png::read(p.string());
  fs::remove(p);
  EXPECT_EQ(d.rgb, rgb);
  expect_error([&] { png::write((temp_path("no") / "dir" / "x.png").string(), 33, 17, rgb.data()); }, "write",
               "cannot open");
}

namespace {

// A selection with the structure the heat-map must show: every query picks its local block and
// the sink block 0; queries of group 1 also pick block 5 (a long-range stripe) once they can see
// it and, for odd queries, the block half-way back; -1 pads the rest. Group 0 picks only local.
std::vector<int32_t> synthetic_selection(int64_t n_q, int64_t h_kv, int64_t topk, int64_t bk) {
  std::vector<int32_t> idx(static_cast<size_t>(n_q * h_kv * topk), -1);
  for (int64_t i = 0; i < n_q; ++i) {
    for (int64_t r = 0; r < h_kv; ++r) {
      int32_t* s = idx.data() + (i * h_kv + r) * topk;
      const int32_t local = static_cast<int32_t>(i / bk);
      std::vector<int32_t> pick = {local};
      if (r == 1) {
        if (local != 0) pick.push_back(0);
        if (local > 5) pick.push_back(5);
        if (i % 2 == 1 && local / 2 != 0 && local / 2 != 5 && local / 2 != local) {
          pick.push_back(local / 2);
        }
      }
      // Shuffled order: the map must not depend on it.
      std::mt19937 rng(static_cast<uint32_t>(i * 7 + r));
      std::shuffle(pick.begin(), pick.end(), rng);
      for (size_t k = 0; k < pick.size() && k < static_cast<size_t>(topk); ++k) s[k] = pick[k];
    }
  }
  return idx;
}

// Expected fraction of the queries of row bin r that chose a block in column c, by brute force.
double expected_fraction(const std::vector<int32_t>& idx, int64_t n_q, int64_t h_kv, int64_t topk, int64_t group,
                         int64_t q_bin, int64_t kb_bin, int64_t r, int64_t c) {
  int64_t hit = 0, n = 0;
  for (int64_t i = r * q_bin; i < std::min(n_q, (r + 1) * q_bin); ++i) {
    ++n;
    bool any = false;
    for (int64_t k = 0; k < topk; ++k) {
      const int32_t b = idx[static_cast<size_t>((i * h_kv + group) * topk + k)];
      any |= b >= 0 && b / kb_bin == c;
    }
    hit += any;
  }
  return static_cast<double>(hit) / static_cast<double>(n);
}

bool is_white(const uint8_t* p) { return p[0] == 255 && p[1] == 255 && p[2] == 255; }
bool is_grey(const uint8_t* p) {
  return p[0] == viz::kFutureGrey && p[1] == viz::kFutureGrey && p[2] == viz::kFutureGrey;
}
int darkness(const uint8_t* p) { return 765 - p[0] - p[1] - p[2]; }

}  // namespace

TEST(Heatmap, LightsExactlyTheSelectedCells) {
  struct Case {
    int64_t n_q, bk, q_bin, kb_bin, cell;
  };
  for (const Case& cs : {Case{256, 16, 0, 1, 3}, Case{129, 16, 8, 2, 2}, Case{1023, 32, 0, 1, 1}}) {
    const int64_t h_kv = 2, topk = 4;
    const auto idx = synthetic_selection(cs.n_q, h_kv, topk, cs.bk);
    for (int64_t group : {0, 1}) {
      viz::HeatmapOptions o;
      o.q_bin = cs.q_bin;
      o.kb_bin = cs.kb_bin;
      o.cell_px = cs.cell;
      o.legend = false;
      const viz::Image im = viz::selection_heatmap(idx.data(), cs.n_q, h_kv, topk, cs.bk, group, o);
      const int64_t q_bin = cs.q_bin ? cs.q_bin : cs.bk;
      const int64_t n_kb = (cs.n_q + cs.bk - 1) / cs.bk;
      const int64_t rows = (cs.n_q + q_bin - 1) / q_bin, cols = (n_kb + cs.kb_bin - 1) / cs.kb_bin;
      ASSERT_EQ(im.width, cols * cs.cell);
      ASSERT_EQ(im.height, rows * cs.cell);
      int lit = 0;
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t q_last = std::min(cs.n_q, (r + 1) * q_bin) - 1;
        for (int64_t c = 0; c < cols; ++c) {
          const double f = expected_fraction(idx, cs.n_q, h_kv, topk, group, q_bin, cs.kb_bin, r, c);
          const uint8_t* px = im.at(c * cs.cell, r * cs.cell);
          // Every pixel of the cell has the cell's colour.
          const uint8_t* corner = im.at(c * cs.cell + cs.cell - 1, r * cs.cell + cs.cell - 1);
          ASSERT_TRUE(std::equal(px, px + 3, corner));
          if (f > 0) {
            ++lit;
            EXPECT_FALSE(is_white(px) || is_grey(px)) << "cell " << r << "," << c << " f " << f;
          } else if (c * cs.kb_bin > q_last / cs.bk) {
            EXPECT_TRUE(is_grey(px)) << "future cell " << r << "," << c;
          } else {
            EXPECT_TRUE(is_white(px)) << "unselected cell " << r << "," << c;
          }
        }
      }
      EXPECT_GE(lit, rows);  // at least the diagonal
      if (group == 1 && cs.kb_bin == 1 && q_bin == cs.bk) {
        // Shade follows the fraction: the sink column (every query) is darker than the
        // half-way stripe (odd queries only).
        const int64_t r = rows - 2, c_half = r / 2;
        ASSERT_GT(r / 2, 5);
        EXPECT_DOUBLE_EQ(expected_fraction(idx, cs.n_q, h_kv, topk, 1, q_bin, 1, r, 0), 1.0);
        EXPECT_DOUBLE_EQ(expected_fraction(idx, cs.n_q, h_kv, topk, 1, q_bin, 1, r, c_half), 0.5);
        EXPECT_GT(darkness(im.at(0, r * cs.cell)), darkness(im.at(c_half * cs.cell, r * cs.cell)));
      }
    }
  }
}

TEST(Heatmap, CoarsensLongSequencesAndDrawsLegend) {
  const int64_t n_q = 4097, bk = 4, h_kv = 1, topk = 3;
  const auto idx = synthetic_selection(n_q, h_kv, topk, bk);
  viz::HeatmapOptions o;
  o.max_cells = 100;
  o.legend = false;
  o.cell_px = 1;
  const viz::Image small = viz::selection_heatmap(idx.data(), n_q, h_kv, topk, bk, 0, o);
  // 1025 query blocks and key blocks, halved until <= 100 cells a side: 65.
  EXPECT_EQ(small.width, 65);
  EXPECT_EQ(small.height, 65);
  // Diagonal: the top-left and bottom-right cells are lit, top-right is future.
  EXPECT_FALSE(is_white(small.at(0, 0)) || is_grey(small.at(0, 0)));
  EXPECT_FALSE(is_white(small.at(small.width - 1, small.height - 1)));
  EXPECT_TRUE(is_grey(small.at(small.width - 1, 0)));

  o.legend = true;
  o.cell_px = 0;  // auto: the map stays within 768 pixels
  const viz::Image big = viz::selection_heatmap(idx.data(), n_q, h_kv, topk, bk, 0, o);
  EXPECT_GT(big.width, 768 * 0.8);
  EXPECT_LE(big.width, 768 + 100);
  int dark = 0;  // text, frame and ticks in the margins
  for (int64_t x = 0; x < big.width; ++x) dark += darkness(big.at(x, 4)) > 300;
  EXPECT_GT(dark, 20);
  const fs::path p = temp_path("heat.png");
  big.write_png(p.string());
  const auto d = png::read(p.string());
  fs::remove(p);
  EXPECT_EQ(d.width, big.width);
  EXPECT_EQ(d.rgb, big.rgb);
}

TEST(Heatmap, BadInputThrows) {
  auto idx = synthetic_selection(64, 2, 4, 16);
  expect_error([&] { viz::selection_heatmap(nullptr, 64, 2, 4, 16, 0); }, "selection_heatmap", "null");
  expect_error([&] { viz::selection_heatmap(idx.data(), 64, 2, 4, 16, 2); }, "selection_heatmap", "group = 2");
  idx[(10 * 2 + 1) * 4 + 3] = 2;  // query 10 sees only block 0
  expect_error([&] { viz::selection_heatmap(idx.data(), 64, 2, 4, 16, 1); }, "selection_heatmap",
               "topk_idx[10, 1, 3] = 2");
}

namespace {

// Per column of a panel's plot area: the topmost and bottommost row holding colour c (-1 if none).
struct Extent {
  std::vector<int64_t> top, bottom;
};
Extent extent(const viz::Image& im, int64_t panel, int64_t panel_height, const uint8_t* c) {
  Extent e;
  const int64_t y0 = panel * panel_height + viz::kCurveTop;
  const int64_t y1 = (panel + 1) * panel_height - viz::kCurveBottom;
  for (int64_t x = viz::kCurveLeft; x < im.width - viz::kCurveRight; ++x) {
    int64_t t = -1, b = -1;
    for (int64_t y = y0; y < y1; ++y) {
      if (std::equal(c, c + 3, im.at(x, y))) {
        if (t < 0) t = y;
        b = y;
      }
    }
    e.top.push_back(t);
    e.bottom.push_back(b);
  }
  return e;
}

}  // namespace

TEST(Curves, MonotoneSeriesDrawMonotoneCurves) {
  std::mt19937_64 rng(8);
  std::uniform_real_distribution<double> step(0.01, 1.0);
  viz::Series up{"recall", "", {}, {}}, down{"loss", "", {}, {}};
  double u = 0.1, d = 5.0;
  for (int i = 0; i < 57; ++i) {
    up.x.push_back(10.0 * i + 3);
    up.y.push_back(u += step(rng));
    down.x.push_back(10.0 * i + 3);
    down.y.push_back(d -= step(rng) * 0.05);
  }
  down.y[20] = std::nan("");  // skipped: the line joins its neighbours
  viz::CurveOptions o;
  o.width = 300;
  o.panel_height = 120;
  const viz::Image im = viz::curves({down, up}, o);
  ASSERT_EQ(im.width, 300);
  ASSERT_EQ(im.height, 240);
  const uint8_t blue[3] = {31, 119, 180};  // first palette colour
  for (int64_t panel : {0, 1}) {
    const Extent e = extent(im, panel, o.panel_height, blue);
    const bool rising = panel == 1;  // "loss" first, then "recall"
    const int64_t y_top = panel * o.panel_height + viz::kCurveTop;
    const int64_t y_bot = (panel + 1) * o.panel_height - viz::kCurveBottom - 1;
    // Every column is drawn (the line is connected from the first step to the last) ...
    for (size_t k = 0; k < e.top.size(); ++k) ASSERT_GE(e.top[k], 0) << "panel " << panel << " column " << k;
    // ... and moves only one way.
    for (size_t k = 1; k < e.top.size(); ++k) {
      if (rising) {
        EXPECT_LE(e.top[k], e.top[k - 1]) << k;
        EXPECT_LE(e.bottom[k], e.bottom[k - 1]) << k;
      } else {
        EXPECT_GE(e.top[k], e.top[k - 1]) << k;
        EXPECT_GE(e.bottom[k], e.bottom[k - 1]) << k;
      }
    }
    // The range fills the plot: the extreme points touch the top and bottom rows.
    EXPECT_EQ(rising ? e.bottom.front() : e.top.front(), rising ? y_bot : y_top);
    EXPECT_EQ(rising ? e.top.back() : e.bottom.back(), rising ? y_top : y_bot);
  }
}

TEST(Curves, SharedPanelsLogScaleAndErrors) {
  viz::Series a{"dense", "loss", {0, 100, 200}, {4.0, 3.0, 2.5}};
  viz::Series b{"msa", "loss", {0, 100, 200}, {4.1, 3.2, 2.6}};
  const viz::Image im = viz::curves({a, b});
  EXPECT_EQ(im.height, viz::CurveOptions{}.panel_height);  // one shared panel
  std::set<std::array<uint8_t, 3>> colours;
  for (int64_t y = viz::kCurveTop; y < im.height - viz::kCurveBottom; ++y) {
    for (int64_t x = viz::kCurveLeft; x < im.width - viz::kCurveRight; ++x) {
      const uint8_t* p = im.at(x, y);
      if (p[0] != p[1] || p[1] != p[2]) colours.insert({p[0], p[1], p[2]});
    }
  }
  EXPECT_EQ(colours.size(), 2u) << "two series, two colours, nothing else coloured in the plot";

  viz::CurveOptions lg;
  lg.log_y = true;
  viz::Series kl{"kl", "", {0, 1, 2, 3}, {1.0, 0.1, 0.0, 0.001}};  // 0 is skipped on a log axis
  const viz::Image im2 = viz::curves({kl}, lg);
  const uint8_t blue[3] = {31, 119, 180};
  const Extent e = extent(im2, 0, lg.panel_height, blue);
  // log10 values 0, -1, -3 over x 0, 1, 3: the point x = 1 sits a third of the way down.
  const int64_t ph = lg.panel_height - viz::kCurveTop - viz::kCurveBottom;
  const int64_t x1 = std::llround(1.0 / 3.0 * static_cast<double>(e.top.size() - 1));
  const int64_t y_expected = viz::kCurveTop + std::llround((ph - 1) / 3.0);
  // (one row of slack for rounding the point and the line)
  EXPECT_LE(e.top[static_cast<size_t>(x1)], y_expected + 1);
  EXPECT_GE(e.bottom[static_cast<size_t>(x1)], y_expected - 1);

  expect_error([] { viz::curves({}); }, "curves", "no finite points");
  expect_error([] { viz::curves({viz::Series{"x", "", {1, 2}, {1}}}); }, "curves", "2 x and 1 y");
}

TEST(Metrics, ReadsJsonLines) {
  const fs::path p = temp_path("metrics.jsonl");
  {
    std::ofstream f(p);
    f << R"({"step": 0, "loss": 5.5, "lr": 0.001, "route": "msa-pt"})"
      << "\n";
    f << R"({"step": 10, "loss": 4.25, "kl": 0.75})"
      << "\n";
    f << "\n";
    f << R"({"note": "no step here", "loss": 1})"
      << "\n";
    f << R"({"step": 20, "loss": 3.5, "kl": 0.5, "recall": 0.9})"
      << "\n";
    f << R"({"step": 30, "loss": 3.)";  // killed mid-write
  }
  const auto all = viz::read_metrics_jsonl(p.string());
  ASSERT_EQ(all.size(), 4u);  // first-appearance order, "route" is not a number
  EXPECT_EQ(all[0].name, "loss");
  EXPECT_EQ(all[1].name, "lr");
  EXPECT_EQ(all[2].name, "kl");
  EXPECT_EQ(all[3].name, "recall");
  EXPECT_EQ(all[0].x, (std::vector<double>{0, 10, 20}));
  EXPECT_EQ(all[0].y, (std::vector<double>{5.5, 4.25, 3.5}));
  EXPECT_EQ(all[2].x, (std::vector<double>{10, 20}));
  EXPECT_EQ(all[2].y, (std::vector<double>{0.75, 0.5}));

  const auto some = viz::read_metrics_jsonl(p.string(), {"kl", "missing"});
  ASSERT_EQ(some.size(), 2u);
  EXPECT_EQ(some[0].name, "kl");
  EXPECT_EQ(some[0].y.size(), 2u);
  EXPECT_TRUE(some[1].x.empty());

  {
    std::ofstream f(p);
    f << R"({"step": 0, "loss": 5.5})"
      << "\n"
      << "garbage\n"
      << R"({"step": 1, "loss": 5})"
      << "\n";
  }
  expect_error([&] { viz::read_metrics_jsonl(p.string()); }, "read_metrics_jsonl", ":2:");
  fs::remove(p);
  expect_error([&] { viz::read_metrics_jsonl(p.string()); }, "read_metrics_jsonl", "cannot open");
}
