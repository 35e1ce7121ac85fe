// trainer/png.h — a dependency-free PNG writer (8-bit RGB, stored deflate blocks) and a reader for
// the files it writes. For msa viz and its tests; torch-free (library msa_data).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace msa::png {

// CRC-32 (ISO 3309, as PNG chunks use) and Adler-32 (as zlib streams use) of n bytes; `prev`
// continues a running value (pass the result of the previous call).
uint32_t crc32(const uint8_t* bytes, size_t n, uint32_t prev = 0);
uint32_t adler32(const uint8_t* bytes, size_t n, uint32_t prev = 1);

// The bytes of a PNG file: width x height pixels, rgb = [height][width][3] row-major, top row
// first. The image data is zlib with uncompressed (stored) deflate blocks: larger files than a
// compressing writer makes, but valid for every PNG reader and needing no zlib.
// Throws msa::Error if width or height is outside [1, 1 << 24] or rgb is null.
std::vector<uint8_t> encode(int64_t width, int64_t height, const uint8_t* rgb);
void write(const std::string& path, int64_t width, int64_t height, const uint8_t* rgb);

struct Decoded {
  int64_t width = 0, height = 0;
  std::vector<uint8_t> rgb;  // [height][width][3]
};
// Reads a PNG made by encode(): checks the signature, every chunk CRC, the zlib header, the
// stored-block lengths, the Adler-32 and filter type 0 on every row. Throws msa::Error naming
// the first problem; compressed (non-stored) deflate data is reported as unsupported.
Decoded decode(const std::vector<uint8_t>& file);
Decoded read(const std::string& path);

}  // namespace msa::png
