// CPU stand-in for <cuda_fp16.h> (test harness only): __half storage plus the conversions the
// kernels use, implemented bit-exactly in software (round to nearest even, subnormals, inf/NaN),
// so no compiler support for _Float16 is needed.  Half arithmetic operators are deliberately
// absent: kernels convert to float and accumulate in float.
#pragma once

#include <cstdint>
#include <cstring>

struct __half {
  uint16_t x;
};

inline float __half2float(__half h) {
  const uint32_t sign = static_cast<uint32_t>(h.x & 0x8000u) << 16;
  uint32_t exp = (h.x >> 10) & 0x1fu;
  uint32_t man = h.x & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1fu) {
    bits = sign | 0x7f800000u | (man << 13);  // inf / NaN
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (man << 13);  // normal: rebias 15 -> 127
  } else if (man == 0) {
    bits = sign;  // +-0
  } else {
    exp = 113u;  // subnormal: normalise
    while ((man & 0x400u) == 0) {
      man <<= 1;
      --exp;
    }
    bits = sign | (exp << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline __half __float2half_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t absu = u & 0x7fffffffu;
  if (absu > 0x7f800000u) return __half{static_cast<uint16_t>(sign | 0x7e00u)};  // NaN
  if (absu >= 0x477ff000u) return __half{static_cast<uint16_t>(sign | 0x7c00u)};  // rounds to inf
  if (absu < 0x38800000u) {
    // Result is subnormal (or zero) in half: value = absu as float / 2^-24, rounded to nearest even.
    if (absu < 0x33000000u) return __half{sign};  // below half of the smallest subnormal
    const uint32_t exp = absu >> 23;
    const uint32_t man = (absu & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126u - exp;  // so that man >> shift is in units of 2^-24
    uint32_t q = man >> shift;
    const uint32_t rem = man & ((1u << shift) - 1u);
    const uint32_t half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (q & 1u))) ++q;
    return __half{static_cast<uint16_t>(sign | q)};
  }
  uint32_t v = absu - 0x38000000u;  // rebias 127 -> 15 (exponent field minus 112)
  v += 0xfffu + ((v >> 13) & 1u);   // round to nearest even on the 13 dropped bits
  return __half{static_cast<uint16_t>(sign | (v >> 13))};
}
