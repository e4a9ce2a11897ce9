// Checks csrc/fast_divmod.h against plain division (see test_cuda_emulated.py): every divisor up
// to 4096 and divisors up to 2^31 - 1, with numerators at 0, around multiples of the divisor,
// at the top of the range (2^31 - 1) and at random; and the divisor 0 of an empty dimension.
#include <cstdio>
#include <random>
#include <vector>

#include "fast_divmod.h"

int main() {
  std::vector<int64_t> divisors;
  for (int64_t d = 1; d <= 4096; ++d) divisors.push_back(d);
  for (int shift = 12; shift < 31; ++shift) {
    for (int64_t d : {(int64_t(1) << shift) - 1, int64_t(1) << shift, (int64_t(1) << shift) + 1}) divisors.push_back(d);
  }
  divisors.push_back(2147483647);
  std::mt19937 gen(0);
  std::uniform_int_distribution<int> any(0, 2147483647);
  int64_t checked = 0;
  for (int64_t d : divisors) {
    const bharnet::FastDivmod fast(d);
    std::vector<int64_t> numerators = {0, 1, d - 1, d, d + 1, 2147483647, 2147483647 - d, 2147483646};
    for (int64_t q : {int64_t(2), int64_t(3), 2147483647 / d, 2147483647 / d - 1}) {
      for (int64_t r : {int64_t(-1), int64_t(0), int64_t(1)}) numerators.push_back(q * d + r);
    }
    for (int i = 0; i < 64; ++i) numerators.push_back(any(gen));
    for (int64_t n : numerators) {
      if (n < 0 || n > 2147483647) continue;
      int quotient = -1, remainder = -1;
      fast.divmod(static_cast<int>(n), quotient, remainder);
      if (quotient != n / d || remainder != n % d || fast.div(static_cast<int>(n)) != n / d) {
        std::printf("FAIL %lld / %lld: got %d rem %d, expected %lld rem %lld\n", (long long)n, (long long)d, quotient,
                    remainder, (long long)(n / d), (long long)(n % d));
        return 1;
      }
      ++checked;
    }
  }
  const bharnet::FastDivmod empty(0);  // an empty dimension's divisor divides by 1
  if (empty.div(12345) != 12345) {
    std::printf("FAIL FastDivmod(0) should divide by 1\n");
    return 1;
  }
  std::printf("ok FastDivmod: %lld quotients of %zu divisors\n", (long long)checked, divisors.size());
  return 0;
}
