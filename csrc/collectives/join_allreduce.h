// Allreduces that are finished by the join step itself (engine.cpp), with no data phase:
//
//   LocalAllreduce   one rank: nothing to exchange (avg over one rank is the identity).
//   InlineAllreduce  payloads of at most kMaxInlinePayloadBytes ride inside the join
//                    message (an all-to-all), then every rank folds the n inputs in rank
//                    order, so all compute bitwise the same result: small allreduces cost
//                    one message latency instead of 2(n-1) ring steps. Bounded in total
//                    bytes too, so the all-to-all never sends much more than the ring would.
//
// Both stand in for the flat algorithms (ring, mpi) they are picked before; explicit
// shm/hierarchical requests always run their node stage, and 3LC never takes these.
#pragma once

#include "allreduce.h"
#include "handshake.h"
#include "transport.h"

namespace pbm {

class LocalAllreduce : public AllreduceAlgorithm {
 public:
  explicit LocalAllreduce(const Transport& transport) : transport_(transport) {}
  const char* name() const override { return "local"; }
  bool enabled(const AllreduceArgs& args) const override {
    return transport_.size() == 1 && !args.wire.threelc();
  }
  AllreduceResult run(const AllreduceArgs& args, const Progress& progress) override { return {}; }

 private:
  const Transport& transport_;
};

class InlineAllreduce : public AllreduceAlgorithm {
 public:
  InlineAllreduce(Transport& transport, const Handshake& handshake)
      : transport_(transport), handshake_(handshake) {}
  const char* name() const override { return "inline"; }
  bool enabled(const AllreduceArgs& args) const override;
  // Like the flat algorithm it stands in for: mpi widens 16-bit floats always, the ring
  // unless they travel 16-bit.
  bool widens(const AllreduceArgs& args) const override {
    return is_half_precision(args.dtype) && (!args.half_wire() || args.algorithm == Algorithm::kMpi);
  }
  JoinRequest join(const AllreduceArgs& args) const override { return {/*payload=*/true, false}; }
  AllreduceResult run(const AllreduceArgs& args, const Progress& progress) override;

 private:
  Transport& transport_;
  const Handshake& handshake_;
};

}  // namespace pbm
