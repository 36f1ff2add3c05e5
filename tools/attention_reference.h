// The float64 reference of masked attention, forward and backward, that the emulator drivers
// (tools/attention_emulate.cpp, tools/attention_sm90_emulate.cpp) check the CUDA kernels
// against, and the keep rule of attention dropout (djepa/ops/attention.py) in plain C++.
//
// For one (sample, head): P = softmax(scale * q k^T) over the visible keys (a row without one:
// P = 0, lse = 0), Z = the dropout factor of each probability (1 without dropout, else 0 or
// 1 / (1 - p)), O = (P * Z) v, delta = rowsum(dO * O), dS = P * (Z * (dO v^T) - delta),
// dq = scale * dS k, dk = scale * dS^T q, dv = (P * Z)^T dO.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace attn_ref {

struct Head {
  std::vector<double> o, lse, dq, dk, dv;  // [Nq * D], [Nq], [Nq * D], [Nk * D], [Nk * D]
};

// q(i, d), k(j, d), v(j, d), dout(i, d): the (rounded) inputs as doubles; visible(j): the key
// mask; z(i, j): the dropout factor of probability (i, j).
template <class Q, class K, class V, class DO, class Visible, class Z>
Head head(int Nq, int Nk, int D, double scale, Q q, K k, V v, DO dout, Visible visible, Z z) {
  Head r;
  r.o.assign(static_cast<size_t>(Nq) * D, 0.0);
  r.lse.assign(Nq, 0.0);
  r.dq.assign(static_cast<size_t>(Nq) * D, 0.0);
  r.dk.assign(static_cast<size_t>(Nk) * D, 0.0);
  r.dv.assign(static_cast<size_t>(Nk) * D, 0.0);
  std::vector<double> P(static_cast<size_t>(Nq) * Nk, 0.0), dS(static_cast<size_t>(Nq) * Nk, 0.0);
  for (int i = 0; i < Nq; ++i) {
    double mx = -INFINITY;
    std::vector<double> s(Nk, -INFINITY);
    for (int j = 0; j < Nk; ++j) {
      if (!visible(j)) continue;
      double acc = 0;
      for (int d = 0; d < D; ++d) acc += q(i, d) * k(j, d);
      s[j] = acc * scale;
      mx = std::max(mx, s[j]);
    }
    double sum = 0;
    for (int j = 0; j < Nk; ++j)
      if (visible(j)) sum += std::exp(s[j] - mx);
    r.lse[i] = sum > 0 ? mx + std::log(sum) : 0.0;
    for (int j = 0; j < Nk; ++j) P[i * Nk + j] = visible(j) ? std::exp(s[j] - mx) / sum : 0.0;
    double delta = 0;
    for (int d = 0; d < D; ++d) {
      double acc = 0;
      for (int j = 0; j < Nk; ++j)
        if (P[i * Nk + j] != 0.0) acc += P[i * Nk + j] * z(i, j) * v(j, d);
      r.o[i * D + d] = acc;
      delta += dout(i, d) * acc;
    }
    for (int j = 0; j < Nk; ++j) {
      if (!visible(j)) continue;
      double dp = 0;
      for (int d = 0; d < D; ++d) dp += dout(i, d) * v(j, d);
      dS[i * Nk + j] = P[i * Nk + j] * (z(i, j) * dp - delta);
    }
  }
  for (int i = 0; i < Nq; ++i)
    for (int d = 0; d < D; ++d) {
      double acc = 0;
      for (int j = 0; j < Nk; ++j)
        if (visible(j)) acc += dS[i * Nk + j] * k(j, d);
      r.dq[i * D + d] = acc * scale;
    }
  for (int j = 0; j < Nk; ++j) {
    if (!visible(j)) continue;
    for (int d = 0; d < D; ++d) {
      double ak = 0, av = 0;
      for (int i = 0; i < Nq; ++i) {
        ak += dS[i * Nk + j] * q(i, d);
        av += P[i * Nk + j] * z(i, j) * dout(i, d);
      }
      r.dk[j * D + d] = ak * scale;
      r.dv[j * D + d] = av;
    }
  }
  return r;
}

// Philox-4x32-10 (Salmon et al. 2011), written independently of the kernels' version.
inline void philox4x32_10(uint32_t (&c)[4], uint32_t k0, uint32_t k1) {
  for (int r = 0; r < 10; ++r) {
    const uint64_t p0 = uint64_t{0xD2511F53u} * c[0], p1 = uint64_t{0xCD9E8D57u} * c[2];
    const uint32_t n[4] = {uint32_t(p1 >> 32) ^ c[1] ^ k0, uint32_t(p1), uint32_t(p0 >> 32) ^ c[3] ^ k1,
                           uint32_t(p0)};
    for (int w = 0; w < 4; ++w) c[w] = n[w];
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
}

// Whether the probability of query i and compacted key position j of head row bh is kept.
inline bool keep(uint64_t seed, uint32_t offset, uint32_t bh, int i, int j, unsigned threshold) {
  uint32_t c[4] = {uint32_t(i & ~8), uint32_t(j & ~9), bh, offset};
  philox4x32_10(c, uint32_t(seed), uint32_t(seed >> 32));
  const uint32_t word = c[((i >> 3) & 1) + 2 * (j & 1)];
  return (((j >> 3) & 1) ? word >> 16 : word & 0xFFFFu) >= threshold;
}

// Random123's known answers for Philox-4x32-10: counter and key all zero, and all ones.
inline bool philox_known_answers() {
  uint32_t zero[4] = {0, 0, 0, 0}, ones[4] = {~0u, ~0u, ~0u, ~0u};
  philox4x32_10(zero, 0, 0);
  philox4x32_10(ones, ~0u, ~0u);
  return zero[0] == 0x6627e8d5u && zero[1] == 0xe169c58du && zero[2] == 0xbc57ac4cu && zero[3] == 0x9b00dbd8u &&
         ones[0] == 0x408f276du && ones[1] == 0x41c83b0eu && ones[2] == 0xa20bc7c6u && ones[3] == 0x6d5451fdu;
}

}  // namespace attn_ref
