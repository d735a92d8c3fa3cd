// The only pybind11 file: exposes the native core to pybrain_mpi/ as `pybrain_mpi._core`.
//
// The core's codes cross as enums exported from here (DType, ReduceOp, Algorithm,
// PayloadCodec, WireKind), so Python never mirrors them and an invalid value cannot reach
// the core. Buffers cross as (address, element count, DType); pybrain_mpi/core/buffers.py
// is the one place that turns tensors and arrays into those. An allreduce is one
// AllreduceArgs object; how its values travel (Wire) is described by the compression
// codec. Every call that can block releases the GIL.
#include <mpi.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <memory>
#include <string>

#include "collectives/engine.h"
#include "collectives/p2p.h"
#include "collectives/exit_watch.h"
#include "collectives/threelc_state.h"
#include "common/errors.h"
#include "compression/payload.h"
#include "kernels/optimizers.h"
#include "kernels/parallel.h"

namespace py = pybind11;

namespace {

std::string compiled_mpi_vendor() {
#if defined(OMPI_MAJOR_VERSION)
  return "Open MPI " + std::to_string(OMPI_MAJOR_VERSION) + "." + std::to_string(OMPI_MINOR_VERSION);
#elif defined(I_MPI_VERSION)
  return std::string("Intel MPI ") + I_MPI_VERSION;
#elif defined(MVAPICH2_VERSION)
  return std::string("MVAPICH2 ") + MVAPICH2_VERSION;
#elif defined(MPICH_VERSION)
  return std::string("MPICH ") + MPICH_VERSION;
#else
  return "unknown MPI";
#endif
}

std::string runtime_mpi_library_version() {
  char text[MPI_MAX_LIBRARY_VERSION_STRING];
  int length = 0;
  MPI_Get_library_version(text, &length);
  return std::string(text, length);
}

int query_thread_level() {
  int level = MPI_THREAD_SINGLE;
  MPI_Query_thread(&level);
  return level;
}

// Raises the Python exception class of pybrain_mpi.errors that matches a core failure;
// `ranks` (may be null) becomes the attribute `ranks_attribute`.
void raise_python(const char* class_name, const std::exception& error, const std::vector<int>* ranks,
                  const char* ranks_attribute) {
  py::object errors = py::module_::import("pybrain_mpi.errors");
  py::object instance = errors.attr(class_name)(py::str(error.what()));
  if (ranks) instance.attr(ranks_attribute) = py::cast(*ranks);
  PyErr_SetObject(errors.attr(class_name).ptr(), instance.ptr());
}

void translate_errors(std::exception_ptr pointer) {
  try {
    if (pointer) std::rethrow_exception(pointer);
  } catch (const pbm::CollectiveTimeoutError& error) {
    raise_python("CollectiveTimeout", error, &error.missing_ranks(), "missing_ranks");
  } catch (const pbm::CollectiveMismatchError& error) {
    raise_python("CollectiveMismatch", error, nullptr, nullptr);
  } catch (const pbm::PeerFailureError& error) {
    raise_python("PeerFailure", error, &error.ranks(), "failed_ranks");
  } catch (const pbm::AgreedFailureError& error) {
    raise_python("PbmError", error, &error.ranks(), "failed_ranks");
  } catch (const pbm::PbmError& error) {
    raise_python("PbmError", error, nullptr, nullptr);
  }
}

template <typename T>
T* pointer(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

const char* name_or_null(const std::string& name) { return name.empty() ? nullptr : name.c_str(); }

// A numpy view of a state buffer that keeps the buffer alive (None for a missing buffer).
py::object residual_view(std::shared_ptr<pbm::FloatBuffer> buffer) {
  if (!buffer) return py::none();
  auto* holder = new std::shared_ptr<pbm::FloatBuffer>(buffer);
  py::capsule owner(holder, [](void* p) { delete static_cast<std::shared_ptr<pbm::FloatBuffer>*>(p); });
  return py::array_t<float>({buffer->size()}, {sizeof(float)}, buffer->data(), owner);
}

// Runs a collective blocking, or queues it and returns the Operation.
void run_blocking(pbm::Engine& engine, pbm::CollectiveSpec spec, double timeout_s) {
  py::gil_scoped_release release;
  engine.run(std::move(spec), timeout_s);
}

std::shared_ptr<pbm::Operation> run_async(pbm::Engine& engine, pbm::CollectiveSpec spec) {
  py::gil_scoped_release release;
  return engine.submit(std::move(spec));
}

pbm::CollectiveSpec broadcast_spec(std::uintptr_t address, size_t count, pbm::DType dtype, int root,
                                   const std::string& name) {
  pbm::CollectiveSpec spec;
  spec.kind = pbm::CollectiveKind::kBroadcast;
  spec.args.data = pointer<void>(address);
  spec.args.count = count;
  spec.args.dtype = dtype;
  spec.args.name = name;
  spec.root = root;
  return spec;
}

}  // namespace

// The codes of the core, one Python enum each (value names are the user-facing strings).
void bind_enums(py::module_& m) {
  py::enum_<pbm::DType>(m, "DType", "Element types of the core (csrc/common/dtype.h).")
      .value("float32", pbm::DType::kFloat32)
      .value("float64", pbm::DType::kFloat64)
      .value("float16", pbm::DType::kFloat16)
      .value("bfloat16", pbm::DType::kBFloat16)
      .value("int32", pbm::DType::kInt32)
      .value("int64", pbm::DType::kInt64)
      .def_property_readonly("itemsize", [](pbm::DType d) { return pbm::dtype_size(d); })
      .def_property_readonly("is_integer", [](pbm::DType d) { return pbm::is_integer(d); });
  py::enum_<pbm::ReduceOp>(m, "ReduceOp", "Reduction ops of an allreduce.")
      .value("sum", pbm::ReduceOp::kSum)
      .value("avg", pbm::ReduceOp::kAvg)
      .value("min", pbm::ReduceOp::kMin)
      .value("max", pbm::ReduceOp::kMax);
  py::enum_<pbm::Algorithm>(m, "Algorithm", "Allreduce algorithms a caller asks for.")
      .value("ring", pbm::Algorithm::kRing)
      .value("mpi", pbm::Algorithm::kMpi)
      .value("shm", pbm::Algorithm::kShm)
      .value("hierarchical", pbm::Algorithm::kHierarchical)
      .value("auto", pbm::Algorithm::kAuto)
      .value("small", pbm::Algorithm::kSmall);
  py::enum_<pbm::PayloadCodec>(m, "PayloadCodec", "Codec ids of self-describing payloads (payload.h).")
      .value("NoCompression", pbm::PayloadCodec::kRaw)
      .value("ThreeLC", pbm::PayloadCodec::kThreeLC)
      .value("Cast", pbm::PayloadCodec::kCast)
      .value("ThreeLCBlock", pbm::PayloadCodec::kThreeLCBlock);
  py::enum_<pbm::WireKind>(m, "WireKind", "How an allreduce's values travel (allreduce.h).")
      .value("plain", pbm::WireKind::kPlain)
      .value("half", pbm::WireKind::kHalf)
      .value("threelc", pbm::WireKind::kThreeLC);
}

// 3LC state and wire descriptions: what the compression codecs hand the core.
void bind_wire(py::module_& m) {
  using pbm::ResidualKind;
  py::enum_<ResidualKind>(m, "ResidualKind", "The residual buffers of a ThreeLCState.")
      .value("residual", ResidualKind::kResidual)
      .value("owner_residual", ResidualKind::kOwner)
      .value("hierarchical_residual", ResidualKind::kHierarchical)
      .value("hierarchical_owner_residual", ResidualKind::kHierarchicalOwner);
  py::class_<pbm::ThreeLCState, std::shared_ptr<pbm::ThreeLCState>>(
      m, "ThreeLCState", "Error-feedback residuals of one tensor; laid out by the path that uses them.")
      .def(py::init<size_t>(), py::arg("count"))
      .def_property_readonly("count", &pbm::ThreeLCState::count)
      .def("buffer", [](const pbm::ThreeLCState& s, ResidualKind kind) { return residual_view(s.buffer(kind)); },
           py::arg("kind"), "A float32 view of a residual buffer, or None while its path has not run.")
      .def(
          "load",
          [](pbm::ThreeLCState& s, ResidualKind kind, py::array_t<float, py::array::c_style | py::array::forcecast> data) {
            s.load(kind, data.data(), static_cast<size_t>(data.size()));
          },
          py::arg("kind"), py::arg("data"), "Restores a saved residual buffer.")
      .def("reset", &pbm::ThreeLCState::reset, "Zeroes the residual and drops every path's buffers.");
  py::class_<pbm::Wire>(m, "Wire", "How an allreduce's values travel; made by a codec's wire().")
      .def_static("plain", [] { return pbm::Wire{}; })
      .def_static(
          "half", [](pbm::DType dtype) { return pbm::Wire{pbm::WireKind::kHalf, dtype, 1.0f, nullptr}; },
          py::arg("dtype"), "16-bit values on the wire (the caller casts the buffer to `dtype`).")
      .def_static(
          "threelc",
          [](float sparsity, std::shared_ptr<pbm::ThreeLCState> state, uint32_t block) {
            return pbm::Wire{pbm::WireKind::kThreeLC, pbm::DType::kBFloat16, sparsity, std::move(state), block};
          },
          py::arg("sparsity"), py::arg("state"), py::arg("block") = 0,
          "The 3LC-compressed allreduce with this error-feedback state (block > 0: one scale per block "
          "of that many elements).")
      .def_readonly("kind", &pbm::Wire::kind)
      .def_readonly("half_dtype", &pbm::Wire::half_dtype)
      .def_readonly("sparsity", &pbm::Wire::sparsity)
      .def_readonly("block", &pbm::Wire::block);
}

// Self-describing payloads behind pybrain_mpi.compression; a codec's wire names the codec.
namespace {
pbm::PayloadCodec payload_codec(const pbm::Wire& wire) {
  switch (wire.kind) {
    case pbm::WireKind::kPlain: return pbm::PayloadCodec::kRaw;
    case pbm::WireKind::kHalf: return pbm::PayloadCodec::kCast;
    case pbm::WireKind::kThreeLC: return wire.block ? pbm::PayloadCodec::kThreeLCBlock : pbm::PayloadCodec::kThreeLC;
  }
  return pbm::PayloadCodec::kRaw;
}

size_t encode_payload(const pbm::Wire& wire, std::uintptr_t address, size_t count, pbm::DType dtype,
                      py::array_t<uint8_t, py::array::c_style> out, const std::string& name) {
  uint8_t* into = out.mutable_data();
  const size_t capacity = static_cast<size_t>(out.size());
  const pbm::Elements grad{pointer<const void>(address), count, dtype};
  py::gil_scoped_release release;
  switch (wire.kind) {
    case pbm::WireKind::kThreeLC: {
      if (!wire.state || wire.state->count() != count) throw pbm::PbmError("3LC encode: the state belongs to another tensor");
      float* residual = wire.state->buffer(pbm::ResidualKind::kResidual)->data();
      return pbm::threelc_encode_payload(grad, residual, wire.sparsity, into, capacity, name_or_null(name), wire.block);
    }
    case pbm::WireKind::kHalf:
      return pbm::cast_encode_payload(grad, wire.half_dtype, into, capacity, name_or_null(name));
    case pbm::WireKind::kPlain:
      break;
  }
  return pbm::raw_encode_payload(grad, into, capacity, name_or_null(name));
}
}  // namespace

void bind_payloads(py::module_& m) {
  m.attr("PAYLOAD_HEADER_BYTES") = pbm::kPayloadHeaderBytes;
  m.def(
      "payload_max_bytes",
      [](const pbm::Wire& wire, size_t count, pbm::DType dtype) {
        const pbm::DType body = wire.kind == pbm::WireKind::kHalf ? wire.half_dtype : dtype;
        return pbm::payload_max_bytes(payload_codec(wire), count, dtype, body, wire.block);
      },
      py::arg("wire"), py::arg("count"), py::arg("dtype"), "Largest payload (header included) of an encode.");
  m.def("encode_payload", &encode_payload, py::arg("wire"), py::arg("address"), py::arg("count"),
        py::arg("dtype"), py::arg("out"), py::arg("name") = "",
        "Writes the payload of `wire`'s codec into `out` (uint8) and returns its length.");
  m.def(
      "read_payload_header",
      [](py::array_t<uint8_t, py::array::c_style> payload, const std::string& name) {
        const pbm::PayloadHeader header =
            pbm::read_payload_header(payload.data(), static_cast<size_t>(payload.size()), name_or_null(name));
        py::dict info;
        info["codec"] = header.codec;
        info["dtype"] = header.dtype;
        info["wire_dtype"] = header.wire_dtype;
        info["count"] = header.count;
        info["scale"] = header.scale;
        info["block"] = header.block;
        info["body_bytes"] = header.body_bytes;
        return info;
      },
      py::arg("payload"), py::arg("name") = "",
      "Validates a payload (header, length, checksum) and returns its header fields.");
  m.def(
      "decode_payload",
      [](py::array_t<uint8_t, py::array::c_style> payload, std::uintptr_t out, size_t count, pbm::DType out_dtype,
         bool add, const std::string& name) {
        const uint8_t* in = payload.data();
        const size_t bytes = static_cast<size_t>(payload.size());
        py::gil_scoped_release release;
        pbm::decode_payload(in, bytes, pbm::MutableElements{pointer<void>(out), count, out_dtype}, add,
                            name_or_null(name));
      },
      py::arg("payload"), py::arg("out"), py::arg("count"), py::arg("out_dtype"), py::arg("add"),
      py::arg("name") = "", "Decodes a payload into `out` (overwrite, or add with add=True).");
}
// Kernels: fused optimizer updates and loss-scaling checks (pybrain_mpi/optim/). Their
// argument lists are torch.optim's hyperparameters, as pybrain_mpi/optim/fused.py passes them.



void bind_kernels(py::module_& m) {
  auto f32 = [](std::uintptr_t address) { return reinterpret_cast<float*>(address); };
  m.def("available_threads", &pbm::available_threads,
        "CPU threads this process may run on (its affinity mask).");
  m.def(
      "grad_sq_norm_and_finite",
      [f32](std::uintptr_t grad, size_t count, double scale, int num_threads) {
        py::gil_scoped_release release;
        const pbm::GradStats stats = pbm::grad_sq_norm_and_finite(
            f32(grad), count, static_cast<float>(scale), num_threads);
        return std::make_pair(stats.sq_norm, stats.finite);
      },
      py::arg("grad"), py::arg("count"), py::arg("scale"), py::arg("num_threads"),
      "One read of a float32 buffer: (sum of (grad*scale)^2 in float64, all finite).");
  m.def(
      "unscale_and_check",
      [](std::uintptr_t grad, size_t count, pbm::DType dtype, double scale, int num_threads) {
        py::gil_scoped_release release;
        if (dtype == pbm::DType::kFloat64)
          return pbm::unscale_and_check(reinterpret_cast<double*>(grad), count, scale, num_threads);
        if (dtype != pbm::DType::kFloat32)
          throw pbm::PbmError(std::string("unscale_and_check takes float32 or float64 gradients, not ") +
                              pbm::dtype_name(dtype));
        return pbm::unscale_and_check(reinterpret_cast<float*>(grad), count,
                                      static_cast<float>(scale), num_threads);
      },
      py::arg("grad"), py::arg("count"), py::arg("dtype"), py::arg("scale"), py::arg("num_threads"),
      "grad *= scale in place; returns True when every element is finite.");
  // Hyperparameters travel as one object per optimizer (the kernels' own structs), so each
  // update entry takes its buffers, their length, the hyperparameters and the thread count.
  py::class_<pbm::SgdParams>(m, "SgdParams", "Hyperparameters of one fused SGD update.")
      .def(py::init([](double lr, double momentum, double dampening, double weight_decay,
                       bool nesterov, bool momentum_initialized, double grad_scale) {
             return pbm::SgdParams{lr, momentum, dampening, weight_decay, nesterov,
                                   momentum_initialized, static_cast<float>(grad_scale)};
           }),
           py::kw_only(), py::arg("lr"), py::arg("momentum"), py::arg("dampening"),
           py::arg("weight_decay"), py::arg("nesterov"), py::arg("momentum_initialized"),
           py::arg("grad_scale"))
      .def_readonly("lr", &pbm::SgdParams::lr)
      .def_readonly("grad_scale", &pbm::SgdParams::grad_scale);
  py::class_<pbm::AdamParams>(m, "AdamParams", "Hyperparameters of one fused Adam/AdamW update.")
      .def(py::init([](double lr, double beta1, double beta2, double eps, double weight_decay,
                       bool decoupled_weight_decay, bool amsgrad, double step, double grad_scale) {
             return pbm::AdamParams{lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay,
                                    amsgrad, step, static_cast<float>(grad_scale)};
           }),
           py::kw_only(), py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"),
           py::arg("weight_decay"), py::arg("decoupled_weight_decay"), py::arg("amsgrad"),
           py::arg("step"), py::arg("grad_scale"))
      .def_readonly("lr", &pbm::AdamParams::lr)
      .def_readonly("step", &pbm::AdamParams::step);
  py::class_<pbm::AdagradParams>(m, "AdagradParams", "Hyperparameters of one fused Adagrad update.")
      .def(py::init([](double lr, double lr_decay, double weight_decay, double eps, double step,
                       double grad_scale) {
             return pbm::AdagradParams{lr, lr_decay, weight_decay, eps, step,
                                       static_cast<float>(grad_scale)};
           }),
           py::kw_only(), py::arg("lr"), py::arg("lr_decay"), py::arg("weight_decay"),
           py::arg("eps"), py::arg("step"), py::arg("grad_scale"))
      .def_readonly("lr", &pbm::AdagradParams::lr)
      .def_readonly("step", &pbm::AdagradParams::step);
  m.def(
      "sgd_step",
      [f32](std::uintptr_t param, std::uintptr_t grad, std::uintptr_t momentum_buffer, size_t count,
            const pbm::SgdParams& p, int num_threads) {
        py::gil_scoped_release release;
        pbm::sgd_step(f32(param), f32(grad), f32(momentum_buffer), count, p, num_threads);
      },
      py::arg("param"), py::arg("grad"), py::arg("momentum_buffer"), py::arg("count"),
      py::arg("params"), py::arg("num_threads"),
      "Fused torch.optim.SGD update over flat float32 buffers (momentum_buffer 0 without momentum).");
  m.def(
      "adam_step",
      [f32](std::uintptr_t param, std::uintptr_t grad, std::array<std::uintptr_t, 3> moments,
            size_t count, const pbm::AdamParams& p, int num_threads) {
        py::gil_scoped_release release;
        pbm::adam_step(f32(param), f32(grad),
                       pbm::AdamMoments{f32(moments[0]), f32(moments[1]), f32(moments[2])},
                       count, p, num_threads);
      },
      py::arg("param"), py::arg("grad"), py::arg("moments"), py::arg("count"), py::arg("params"),
      py::arg("num_threads"),
      "Fused torch.optim.Adam/AdamW update over flat float32 buffers; moments are "
      "(exp_avg, exp_avg_sq, max_exp_avg_sq or 0 without amsgrad).");
  m.def(
      "adagrad_step",
      [f32](std::uintptr_t param, std::uintptr_t grad, std::uintptr_t state_sum, size_t count,
            const pbm::AdagradParams& p, int num_threads) {
        py::gil_scoped_release release;
        pbm::adagrad_step(f32(param), f32(grad), f32(state_sum), count, p, num_threads);
      },
      py::arg("param"), py::arg("grad"), py::arg("state_sum"), py::arg("count"), py::arg("params"),
      py::arg("num_threads"), "Fused torch.optim.Adagrad update over flat float32 buffers.");
}

// Shared-memory node stage (csrc/collectives/node_stage.h): methods added to Engine.
void bind_node_stage(py::class_<pbm::Engine>& engine) {
  auto node = [](pbm::Engine& e) -> pbm::NodeStage& {
    if (!e.node()) throw pbm::PbmError("the shared-memory node stage is not set up (pybrain_mpi.init() does it)");
    return *e.node();
  };
  engine
      .def(
          "configure_nodes",
          [](pbm::Engine& e, int node_color) {
            py::gil_scoped_release release;
            e.configure_nodes(node_color);
          },
          py::arg("node_color"),
          "Sets up the node stage; collective. node_color: the same on all ranks of a node.")
      .def(
          "shared_alloc",
          [node](pbm::Engine& e, size_t bytes) {
            pbm::NodeStage& stage = node(e);
            py::gil_scoped_release release;
            return reinterpret_cast<std::uintptr_t>(stage.pool().alloc(bytes));
          },
          py::arg("bytes"), "Address of `bytes` in this rank's shared pool segment; collective over the node.")
      .def("shared_reset", [node](pbm::Engine& e) { node(e).pool().reset(); },
           "Makes all pool memory reusable (earlier shared buffers then alias new ones).")
      .def_property_readonly("shm_bytes", &pbm::Engine::shm_bytes)
      .def_property(
          "shm_min_bytes", [](pbm::Engine& e) { return e.algorithms().shm_min_bytes; },
          [](pbm::Engine& e, size_t bytes) { e.algorithms().shm_min_bytes = bytes; })
      .def_property(
          "small_max_bytes", [](pbm::Engine& e) { return e.algorithms().small_max_bytes; },
          [](pbm::Engine& e, size_t bytes) { e.algorithms().small_max_bytes = bytes; })
      .def_property(
          "shm_chunk_bytes", [node](pbm::Engine& e) { return node(e).chunk_bytes; },
          [node](pbm::Engine& e, size_t bytes) { node(e).chunk_bytes = std::max<size_t>(bytes, 4096); })
      .def(
          "node_layout",
          [node](pbm::Engine& e) {
            pbm::NodeStage& stage = node(e);
            py::dict layout;
            layout["local_rank"] = stage.local_rank();
            layout["local_size"] = stage.local_size();
            layout["node_count"] = stage.node_count();
            layout["slices"] = stage.slices();
            layout["node_world_ranks"] = stage.node_world_ranks();
            return layout;
          },
          "The node stage's view of the topology.");
}

// One allreduce call, as Python describes it (the engine resolves the rest).
void bind_allreduce_args(py::module_& m) {
  py::class_<pbm::AllreduceArgs>(m, "AllreduceArgs", "One allreduce: buffer, op, algorithm and wire.")
      .def(py::init([](std::uintptr_t address, size_t count, pbm::DType dtype, pbm::ReduceOp op,
                       pbm::Algorithm algorithm, std::string name) {
             pbm::AllreduceArgs args;
             args.data = pointer<void>(address);
             args.count = count;
             args.dtype = dtype;
             args.op = op;
             args.algorithm = algorithm;
             args.name = std::move(name);
             return args;
           }),
           py::arg("address"), py::arg("count"), py::arg("dtype"), py::arg("op"), py::arg("algorithm"),
           py::arg("name") = "")
      .def_readwrite("wire", &pbm::AllreduceArgs::wire, "How the values travel (default: plain).")
      .def_readwrite("check_finite", &pbm::AllreduceArgs::check_finite,
                     "Have the Operation report finite() of the result.")
      .def_readwrite("signature", &pbm::AllreduceArgs::signature,
                     "The caller's 64-bit description of the call, compared across ranks (0: none).")
      .def_property_readonly("count", [](const pbm::AllreduceArgs& a) { return a.count; })
      .def_property_readonly("dtype", [](const pbm::AllreduceArgs& a) { return a.dtype; });
}

void bind_engine(py::module_& m) {
  py::class_<pbm::Operation, std::shared_ptr<pbm::Operation>>(
      m, "Operation", "A queued collective; pybrain_mpi.Handle wraps it.")
      .def(
          "wait",
          [](pbm::Operation& op, double timeout_s) {
            py::gil_scoped_release release;
            return op.wait(timeout_s);
          },
          py::arg("timeout_s"), "Waits up to timeout_s (negative: forever); returns done().")
      .def("done", &pbm::Operation::done)
      .def("finite", &pbm::Operation::finite,
           "1: every element of the result is finite, 0: not, -1: not asked for or not done.")
      .def("check", &pbm::Operation::rethrow_if_failed, "Raises the collective's error, if any.")
      .def("describe", &pbm::Operation::describe)
      .def("phase", [](pbm::Operation& op) { return op.status().phase(); })
      .def("waiting_for", [](pbm::Operation& op) { return op.status().waiting_for(); });

  py::class_<pbm::Engine> engine(m, "Engine", "Owns the duplicated communicator and progress thread.");
  engine
      .def(py::init([](int64_t fortran_comm, double timeout_s, bool progress_thread) {
             MPI_Comm comm = MPI_Comm_f2c(static_cast<MPI_Fint>(fortran_comm));
             py::gil_scoped_release release;
             return std::make_unique<pbm::Engine>(comm, timeout_s, progress_thread);
           }),
           py::arg("fortran_comm"), py::arg("timeout_s"), py::arg("progress_thread"))
      .def_property_readonly("rank", &pbm::Engine::rank)
      .def_property_readonly("size", &pbm::Engine::size)
      .def_property_readonly("bytes_sent", &pbm::Engine::bytes_sent)
      .def_property_readonly("timeout_s", &pbm::Engine::timeout_s)
      .def_property_readonly("negotiation_rounds", &pbm::Engine::negotiation_rounds,
                             "Rounds in which the ranks negotiated the order of collectives.")
      .def_property(
          "ring_chunk_bytes", [](pbm::Engine& e) { return e.algorithms().ring().chunk_bytes; },
          [](pbm::Engine& e, size_t bytes) { e.algorithms().ring().chunk_bytes = bytes; })
      .def_property(
          "ring_window", [](pbm::Engine& e) { return e.algorithms().ring().window; },
          [](pbm::Engine& e, int window) { e.algorithms().ring().window = window; })
      .def(
          "allreduce",
          [](pbm::Engine& e, const pbm::AllreduceArgs& args, double timeout_s) {
            run_blocking(e, pbm::CollectiveSpec{pbm::CollectiveKind::kAllreduce, args, 0}, timeout_s);
          },
          py::arg("args"), py::arg("timeout_s"), "Runs an allreduce; returns when it is done on this rank.")
      .def(
          "allreduce_async",
          [](pbm::Engine& e, const pbm::AllreduceArgs& args) {
            return run_async(e, pbm::CollectiveSpec{pbm::CollectiveKind::kAllreduce, args, 0});
          },
          py::arg("args"), "Queues an allreduce for the progress thread; returns its Operation.")
      .def(
          "broadcast",
          [](pbm::Engine& e, std::uintptr_t address, size_t count, pbm::DType dtype, int root, const std::string& name,
             double timeout_s) { run_blocking(e, broadcast_spec(address, count, dtype, root, name), timeout_s); },
          py::arg("address"), py::arg("count"), py::arg("dtype"), py::arg("root"), py::arg("name"),
          py::arg("timeout_s"))
      .def(
          "broadcast_async",
          [](pbm::Engine& e, std::uintptr_t address, size_t count, pbm::DType dtype, int root, const std::string& name) {
            return run_async(e, broadcast_spec(address, count, dtype, root, name));
          },
          py::arg("address"), py::arg("count"), py::arg("dtype"), py::arg("root"), py::arg("name"))
      .def(
          "barrier",
          [](pbm::Engine& e, double timeout_s) {
            pbm::CollectiveSpec spec;
            spec.kind = pbm::CollectiveKind::kBarrier;
            run_blocking(e, std::move(spec), timeout_s);
          },
          py::arg("timeout_s"))
      .def(
          "shutdown",
          [](pbm::Engine& e) {
            py::gil_scoped_release release;
            e.shutdown();
          },
          "Stops the progress thread; queued collectives fail, a stuck one is aborted.");
  bind_node_stage(engine);
}

// --- point-to-point messages between pipeline stages (collectives/p2p.h) ---------------
// One contiguous block: pybrain_mpi/parallel/p2p.py is its only user.
void bind_point_to_point(py::module_& m) {
  py::class_<pbm::P2PRequest, std::shared_ptr<pbm::P2PRequest>>(m, "P2PRequest",
                                                                "A posted send or receive (parallel/p2p.py).")
      .def_readonly("name", &pbm::P2PRequest::name)
      .def_readonly("peer", &pbm::P2PRequest::peer)
      .def_readonly("done", &pbm::P2PRequest::done);
  py::class_<pbm::PointToPoint>(m, "PointToPoint", "Non-blocking messages with deadlines on a duplicated communicator.")
      .def(py::init([](int64_t fortran_comm, double timeout_s, std::vector<int> world_ranks) {
             MPI_Comm comm = MPI_Comm_f2c(static_cast<MPI_Fint>(fortran_comm));
             py::gil_scoped_release release;
             auto p2p = std::make_unique<pbm::PointToPoint>(comm, timeout_s);
             if (!world_ranks.empty()) {
               if (static_cast<int>(world_ranks.size()) != p2p->size())
                 throw pbm::PbmError("PointToPoint: world_ranks must list one rank per communicator rank");
               p2p->set_world_ranks(std::move(world_ranks));
             }
             return p2p;
           }),
           py::arg("fortran_comm"), py::arg("timeout_s"), py::arg("world_ranks") = std::vector<int>{})
      .def_property_readonly("rank", &pbm::PointToPoint::rank)
      .def_property_readonly("size", &pbm::PointToPoint::size)
      .def_property_readonly("timeout_s", &pbm::PointToPoint::timeout_s)
      .def_property_readonly("bytes_sent", &pbm::PointToPoint::bytes_sent)
      .def(
          "isend",
          [](pbm::PointToPoint& p, std::uintptr_t address, size_t count, pbm::DType dtype, std::vector<int64_t> shape,
             int dest, int tag, std::string name) {
            py::gil_scoped_release release;
            return p.isend(pointer<const void>(address), count, dtype, std::move(shape), dest, tag, std::move(name));
          },
          py::arg("address"), py::arg("count"), py::arg("dtype"), py::arg("shape"), py::arg("dest"), py::arg("tag"),
          py::arg("name"))
      .def(
          "irecv",
          [](pbm::PointToPoint& p, std::uintptr_t address, size_t count, pbm::DType dtype, std::vector<int64_t> shape,
             int source, int tag, std::string name, bool with_header) {
            py::gil_scoped_release release;
            return p.irecv(pointer<void>(address), count, dtype, std::move(shape), source, tag, std::move(name),
                           with_header);
          },
          py::arg("address"), py::arg("count"), py::arg("dtype"), py::arg("shape"), py::arg("source"), py::arg("tag"),
          py::arg("name"), py::arg("with_header") = true)
      .def(
          "recv_header",
          [](pbm::PointToPoint& p, int source, int tag, const std::string& name, double timeout_s) {
            py::gil_scoped_release release;
            return p.recv_header(source, tag, name, timeout_s);
          },
          py::arg("source"), py::arg("tag"), py::arg("name"), py::arg("timeout_s"))
      .def(
          "wait",
          [](pbm::PointToPoint& p, pbm::P2PRequest& request, double timeout_s) {
            py::gil_scoped_release release;
            p.wait(request, timeout_s);
          },
          py::arg("request"), py::arg("timeout_s"))
      .def(
          "test",
          [](pbm::PointToPoint& p, pbm::P2PRequest& request) {
            py::gil_scoped_release release;
            return p.test(request);
          },
          py::arg("request"))
      .def(
          "probe_any",
          [](pbm::PointToPoint& p, int tag, double timeout_s) {
            py::gil_scoped_release release;
            return p.probe_any(tag, timeout_s);
          },
          py::arg("tag"), py::arg("timeout_s"))
      .def("abort", &pbm::PointToPoint::abort);
}
// --- end of point-to-point ---------------------------------------------------------------

PYBIND11_MODULE(_core, m) {
  m.doc() = "pybrain-mpi native core: collectives over MPI (see pybrain_mpi for the API)";
  py::register_exception_translator(&translate_errors);
  m.def("compiled_mpi_vendor", &compiled_mpi_vendor,
        "MPI implementation (and version) whose mpi.h this extension was compiled against.");
  m.def("mpi_library_version", &runtime_mpi_library_version,
        "MPI_Get_library_version() of the MPI library loaded in this process.");
  m.def("query_thread_level", &query_thread_level,
        "MPI_Query_thread(): the thread support level MPI was initialized with.");
  m.def("watch_exit", &pbm::watch_exit, py::arg("seconds"), py::arg("message"), py::arg("status"),
        "Ends the process with _exit(status), after writing message to stderr, if it is still "
        "alive `seconds` from now (bounds MPI_Finalize after a failed collective).");
  m.attr("MPI_THREAD_MULTIPLE") = static_cast<int>(MPI_THREAD_MULTIPLE);
  m.attr("MAX_INLINE_PAYLOAD_BYTES") = pbm::kMaxInlinePayloadBytes;
  bind_enums(m);
  bind_wire(m);
  bind_allreduce_args(m);
  bind_engine(m);
  bind_payloads(m);
  bind_kernels(m);
  bind_point_to_point(m);
}
