// trainer/png.cpp — PNG encoding with stored deflate blocks, CRC-32, Adler-32 and the matching
// reader declared in png.h.
#include "png.h"

#include <msa/common.h>

#include <array>
#include <cstring>
#include <fstream>
#include <iterator>

namespace msa::png {
namespace {

[[noreturn]] void fail(const std::string& fn, const std::string& msg) {
  throw msa::Error("msa::png::" + fn + ": " + msg);
}

const std::array<uint32_t, 256>& crc_table() {
  static const std::array<uint32_t, 256> t = [] {
    std::array<uint32_t, 256> a{};
    for (uint32_t n = 0; n < 256; ++n) {
      uint32_t c = n;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xedb88320u ^ (c >> 1) : c >> 1;
      a[n] = c;
    }
    return a;
  }();
  return t;
}

constexpr uint8_t kSignature[8] = {137, 80, 78, 71, 13, 10, 26, 10};
// A stored deflate block holds at most 65535 bytes.
constexpr size_t kMaxStored = 65535;

void put32(std::vector<uint8_t>& out, uint32_t v) {
  out.push_back(static_cast<uint8_t>(v >> 24));
  out.push_back(static_cast<uint8_t>(v >> 16));
  out.push_back(static_cast<uint8_t>(v >> 8));
  out.push_back(static_cast<uint8_t>(v));
}

uint32_t get32(const uint8_t* p) {
  return (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) | (uint32_t{p[2]} << 8) | uint32_t{p[3]};
}

void chunk(std::vector<uint8_t>& out, const char type[4], const std::vector<uint8_t>& data) {
  put32(out, static_cast<uint32_t>(data.size()));
  const size_t start = out.size();
  out.insert(out.end(), type, type + 4);
  out.insert(out.end(), data.begin(), data.end());
  put32(out, crc32(out.data() + start, out.size() - start));
}

}  // namespace

uint32_t crc32(const uint8_t* bytes, size_t n, uint32_t prev) {
  const auto& t = crc_table();
  uint32_t c = prev ^ 0xffffffffu;
  for (size_t i = 0; i < n; ++i) c = t[(c ^ bytes[i]) & 0xff] ^ (c >> 8);
  return c ^ 0xffffffffu;
}

uint32_t adler32(const uint8_t* bytes, size_t n, uint32_t prev) {
  uint32_t a = prev & 0xffff, b = prev >> 16;
  // 5552 bytes is the longest run whose sums cannot overflow 32 bits before the modulo.
  while (n > 0) {
    const size_t run = n < 5552 ? n : 5552;
    for (size_t i = 0; i < run; ++i) {
      a += bytes[i];
      b += a;
    }
    a %= 65521;
    b %= 65521;
    bytes += run;
    n -= run;
  }
  return (b << 16) | a;
}

std::vector<uint8_t> encode(int64_t width, int64_t height, const uint8_t* rgb) {
  constexpr int64_t kMaxSide = int64_t{1} << 24;
  if (width < 1 || width > kMaxSide || height < 1 || height > kMaxSide) {
    fail("encode",
         "size " + std::to_string(width) + " x " + std::to_string(height) + ", expected each side in 1..16777216");
  }
  if (rgb == nullptr) fail("encode", "rgb is null");
  // Raw image data: each row is filter byte 0 (none) then its RGB bytes.
  const size_t row = static_cast<size_t>(width) * 3;
  std::vector<uint8_t> raw;
  raw.reserve((row + 1) * static_cast<size_t>(height));
  for (int64_t y = 0; y < height; ++y) {
    raw.push_back(0);
    const uint8_t* src = rgb + static_cast<size_t>(y) * row;
    raw.insert(raw.end(), src, src + row);
  }
  // zlib: CMF 0x78 (deflate, 32K window), FLG 0x01 (no dictionary, check bits make the 16-bit
  // header a multiple of 31), stored blocks, Adler-32 of the raw data.
  std::vector<uint8_t> z;
  z.reserve(raw.size() + raw.size() / kMaxStored * 5 + 16);
  z.push_back(0x78);
  z.push_back(0x01);
  size_t pos = 0;
  do {
    const size_t n = std::min(kMaxStored, raw.size() - pos);
    const bool last = pos + n == raw.size();
    z.push_back(last ? 1 : 0);  // BFINAL, BTYPE = 00 (stored); the rest of the byte is padding
    z.push_back(static_cast<uint8_t>(n));
    z.push_back(static_cast<uint8_t>(n >> 8));
    z.push_back(static_cast<uint8_t>(~n));
    z.push_back(static_cast<uint8_t>(~n >> 8));
    z.insert(z.end(), raw.begin() + static_cast<std::ptrdiff_t>(pos),
             raw.begin() + static_cast<std::ptrdiff_t>(pos + n));
    pos += n;
  } while (pos < raw.size());
  put32(z, adler32(raw.data(), raw.size()));

  std::vector<uint8_t> out(kSignature, kSignature + 8);
  std::vector<uint8_t> ihdr;
  put32(ihdr, static_cast<uint32_t>(width));
  put32(ihdr, static_cast<uint32_t>(height));
  ihdr.insert(ihdr.end(), {8, 2, 0, 0, 0});  // 8 bits, truecolour, deflate, filter 0, no interlace
  chunk(out, "IHDR", ihdr);
  chunk(out, "IDAT", z);
  chunk(out, "IEND", {});
  return out;
}

void write(const std::string& path, int64_t width, int64_t height, const uint8_t* rgb) {
  const std::vector<uint8_t> bytes = encode(width, height, rgb);
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  if (!f) fail("write", "cannot open '" + path + "' for writing");
  f.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  if (!f) fail("write", "writing '" + path + "' failed");
}

Decoded decode(const std::vector<uint8_t>& file) {
  const char* fn = "decode";
  if (file.size() < 8 || std::memcmp(file.data(), kSignature, 8) != 0) fail(fn, "no PNG signature");
  Decoded d;
  std::vector<uint8_t> z;
  bool seen_ihdr = false, seen_iend = false;
  size_t pos = 8;
  while (pos < file.size() && !seen_iend) {
    if (file.size() - pos < 12) fail(fn, "truncated chunk at byte " + std::to_string(pos));
    const uint32_t len = get32(&file[pos]);
    if (file.size() - pos - 12 < len) fail(fn, "chunk at byte " + std::to_string(pos) + " overruns");
    const std::string type(reinterpret_cast<const char*>(&file[pos + 4]), 4);
    const uint8_t* data = &file[pos + 8];
    if (crc32(&file[pos + 4], len + 4) != get32(data + len)) fail(fn, "bad CRC in chunk " + type);
    if (type == "IHDR") {
      if (len != 13) fail(fn, "IHDR length " + std::to_string(len) + ", expected 13");
      d.width = get32(data);
      d.height = get32(data + 4);
      if (data[8] != 8 || data[9] != 2 || data[10] != 0 || data[11] != 0 || data[12] != 0) {
        fail(fn, "only 8-bit RGB, filter method 0, no interlace is supported");
      }
      seen_ihdr = true;
    } else if (type == "IDAT") {
      z.insert(z.end(), data, data + len);
    } else if (type == "IEND") {
      seen_iend = true;
    }
    pos += 12 + len;
  }
  if (!seen_ihdr || !seen_iend) fail(fn, "missing IHDR or IEND");
  if (z.size() < 6 || z[0] != 0x78 || (z[0] * 256 + z[1]) % 31 != 0 || (z[1] & 0x20)) {
    fail(fn, "bad zlib header");
  }
  std::vector<uint8_t> raw;
  size_t p = 2;
  for (bool last = false; !last;) {
    if (z.size() - p < 5) fail(fn, "truncated deflate block");
    last = z[p] & 1;
    if (((z[p] >> 1) & 3) != 0) fail(fn, "compressed deflate blocks are not supported");
    const uint32_t n = z[p + 1] | (uint32_t{z[p + 2]} << 8);
    const uint32_t nn = z[p + 3] | (uint32_t{z[p + 4]} << 8);
    if ((n ^ 0xffff) != nn) fail(fn, "stored block length check fails");
    p += 5;
    if (z.size() - p < n) fail(fn, "stored block overruns the data");
    raw.insert(raw.end(), z.begin() + static_cast<std::ptrdiff_t>(p), z.begin() + static_cast<std::ptrdiff_t>(p + n));
    p += n;
  }
  if (z.size() - p != 4 || get32(&z[p]) != adler32(raw.data(), raw.size())) {
    fail(fn, "bad Adler-32");
  }
  const size_t row = static_cast<size_t>(d.width) * 3;
  if (raw.size() != (row + 1) * static_cast<size_t>(d.height)) {
    fail(fn, "image data holds " + std::to_string(raw.size()) + " bytes, expected " +
                 std::to_string((row + 1) * static_cast<size_t>(d.height)));
  }
  d.rgb.reserve(row * static_cast<size_t>(d.height));
  for (int64_t y = 0; y < d.height; ++y) {
    const uint8_t* r = &raw[static_cast<size_t>(y) * (row + 1)];
    if (r[0] != 0) fail(fn, "row " + std::to_string(y) + " uses filter " + std::to_string(r[0]));
    d.rgb.insert(d.rgb.end(), r + 1, r + 1 + row);
  }
  return d;
}

Decoded read(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) fail("read", "cannot open '" + path + "'");
  const std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  return decode(bytes);
}

}  // namespace msa::png
