// ctypes entry points that expose the fp16/bf16 stand-in conversions (test harness only), so the
// test suite can check them bit for bit against torch's own conversions.
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

extern "C" void emu_half_to_float(const uint16_t* in, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = __half2float(__half{in[i]});
}
extern "C" void emu_float_to_half(const float* in, uint16_t* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = __float2half_rn(in[i]).x;
}
extern "C" void emu_bf16_to_float(const uint16_t* in, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = __bfloat162float(__nv_bfloat16{in[i]});
}
extern "C" void emu_float_to_bf16(const float* in, uint16_t* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = __float2bfloat16_rn(in[i]).x;
}
