// The only pybind11 file: exposes the native core to pybrain_mpi/ as `pybrain_mpi._core`.
//
// Buffers cross as (address, element count, dtype code); pybrain_mpi/communication/buffers.py
// is the one place that turns tensors and arrays into those. Every call that can block
// releases the GIL.
#include <mpi.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <memory>
#include <string>

#include "collectives/engine.h"
#include "common/errors.h"
#include "compression/payload.h"
#include "compression/threelc.h"

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

// Raises the Python exception class of pybrain_mpi.errors that matches a core failure.
void raise_python(const char* class_name, const std::exception& error,
                  const std::vector<int>* missing_ranks) {
  py::object errors = py::module_::import("pybrain_mpi.errors");
  py::object instance = errors.attr(class_name)(py::str(error.what()));
  if (missing_ranks) instance.attr("missing_ranks") = py::cast(*missing_ranks);
  PyErr_SetObject(errors.attr(class_name).ptr(), instance.ptr());
}

pbm::CollectiveSpec make_spec(pbm::CollectiveKind kind, std::uintptr_t address, size_t count,
                              int dtype, int op, int algorithm, int root, const std::string& name) {
  pbm::CollectiveSpec spec;
  spec.kind = kind;
  spec.data = reinterpret_cast<void*>(address);
  spec.count = count;
  spec.dtype = static_cast<pbm::DType>(dtype);
  pbm::dtype_size(spec.dtype);  // validates the code
  spec.op = static_cast<pbm::ReduceOp>(op);
  spec.algorithm = static_cast<pbm::Algorithm>(algorithm);
  spec.root = root;
  spec.name = name;
  return spec;
}

// Runs a collective blocking (returns None) or queues it (returns the Operation).
py::object start(pbm::Engine& engine, pbm::CollectiveSpec spec, bool async_op, double timeout_s) {
  if (async_op) {
    std::shared_ptr<pbm::Operation> op;
    {
      py::gil_scoped_release release;
      op = engine.submit(std::move(spec));
    }
    return py::cast(op);
  }
  py::gil_scoped_release release;
  engine.run(std::move(spec), timeout_s);
  return py::none();
}

}  // namespace

// Compression codecs (csrc/compression/): body-level 3LC for tests and benchmarks, and the
// self-describing payloads behind pybrain_mpi.compression. Buffers cross as addresses.
void bind_compression(py::module_& m) {
  auto name_or_null = [](const std::string& name) { return name.empty() ? nullptr : name.c_str(); };
  m.attr("PAYLOAD_HEADER_BYTES") = pbm::kPayloadHeaderBytes;
  m.def("threelc_max_encoded_bytes", &pbm::threelc_max_encoded_bytes, py::arg("count"),
        "Upper bound of a 3LC body for `count` elements (one byte per 5 elements).");
  m.def(
      "threelc_encode",
      [=](std::uintptr_t grad, int dtype, size_t count, std::uintptr_t residual, float sparsity,
          std::uintptr_t out, const std::string& name) {
        py::gil_scoped_release release;
        const pbm::ThreeLCEncoded encoded = pbm::threelc_encode(
            reinterpret_cast<const void*>(grad), static_cast<pbm::DType>(dtype), count,
            reinterpret_cast<float*>(residual), sparsity, reinterpret_cast<uint8_t*>(out),
            name_or_null(name));
        return std::make_pair(encoded.bytes, encoded.scale);
      },
      py::arg("grad"), py::arg("dtype"), py::arg("count"), py::arg("residual"),
      py::arg("sparsity"), py::arg("out"), py::arg("name") = "",
      "3LC body encode (no header); returns (body bytes, scale M).");
  m.def(
      "threelc_decode",
      [=](std::uintptr_t in, size_t bytes, float scale, size_t count, std::uintptr_t out,
          int out_dtype, bool add, const std::string& name) {
        py::gil_scoped_release release;
        auto* body = reinterpret_cast<const uint8_t*>(in);
        if (add) {
          pbm::threelc_decode_add(body, bytes, scale, count, reinterpret_cast<void*>(out),
                                  static_cast<pbm::DType>(out_dtype), name_or_null(name));
        } else {
          pbm::threelc_decode(body, bytes, scale, count, reinterpret_cast<void*>(out),
                              static_cast<pbm::DType>(out_dtype), name_or_null(name));
        }
      },
      py::arg("body"), py::arg("bytes"), py::arg("scale"), py::arg("count"), py::arg("out"),
      py::arg("out_dtype"), py::arg("add"), py::arg("name") = "",
      "3LC body decode into out (overwrite, or add with add=True).");
  m.def(
      "payload_max_bytes",
      [](int codec, size_t count, int dtype, int wire_dtype) {
        return pbm::payload_max_bytes(static_cast<pbm::PayloadCodec>(codec), count,
                                      static_cast<pbm::DType>(dtype),
                                      static_cast<pbm::DType>(wire_dtype));
      },
      py::arg("codec"), py::arg("count"), py::arg("dtype"), py::arg("wire_dtype"));
  m.def(
      "threelc_encode_payload",
      [=](std::uintptr_t grad, int dtype, size_t count, std::uintptr_t residual, float sparsity,
          std::uintptr_t out, size_t capacity, const std::string& name) {
        py::gil_scoped_release release;
        return pbm::threelc_encode_payload(
            reinterpret_cast<const void*>(grad), static_cast<pbm::DType>(dtype), count,
            reinterpret_cast<float*>(residual), sparsity, reinterpret_cast<uint8_t*>(out),
            capacity, name_or_null(name));
      },
      py::arg("grad"), py::arg("dtype"), py::arg("count"), py::arg("residual"),
      py::arg("sparsity"), py::arg("out"), py::arg("capacity"), py::arg("name") = "");
  m.def(
      "cast_encode_payload",
      [=](std::uintptr_t in, int dtype, size_t count, int wire_dtype, std::uintptr_t out,
          size_t capacity, const std::string& name) {
        py::gil_scoped_release release;
        return pbm::cast_encode_payload(reinterpret_cast<const void*>(in),
                                        static_cast<pbm::DType>(dtype), count,
                                        static_cast<pbm::DType>(wire_dtype),
                                        reinterpret_cast<uint8_t*>(out), capacity,
                                        name_or_null(name));
      },
      py::arg("data"), py::arg("dtype"), py::arg("count"), py::arg("wire_dtype"), py::arg("out"),
      py::arg("capacity"), py::arg("name") = "");
  m.def(
      "raw_encode_payload",
      [=](std::uintptr_t in, int dtype, size_t count, std::uintptr_t out, size_t capacity,
          const std::string& name) {
        py::gil_scoped_release release;
        return pbm::raw_encode_payload(reinterpret_cast<const void*>(in),
                                       static_cast<pbm::DType>(dtype), count,
                                       reinterpret_cast<uint8_t*>(out), capacity,
                                       name_or_null(name));
      },
      py::arg("data"), py::arg("dtype"), py::arg("count"), py::arg("out"), py::arg("capacity"),
      py::arg("name") = "");
  m.def(
      "read_payload_header",
      [=](std::uintptr_t in, size_t bytes, const std::string& name) {
        const pbm::PayloadHeader header =
            pbm::read_payload_header(reinterpret_cast<const uint8_t*>(in), bytes, name_or_null(name));
        py::dict info;
        info["codec"] = static_cast<int>(header.codec);
        info["dtype"] = static_cast<int>(header.dtype);
        info["wire_dtype"] = static_cast<int>(header.wire_dtype);
        info["count"] = header.count;
        info["scale"] = header.scale;
        info["body_bytes"] = header.body_bytes;
        return info;
      },
      py::arg("payload"), py::arg("bytes"), py::arg("name") = "",
      "Validates a payload (header, length, checksum) and returns its header fields.");
  m.def(
      "decode_payload",
      [=](std::uintptr_t in, size_t bytes, std::uintptr_t out, size_t count, int out_dtype,
          bool add, const std::string& name) {
        py::gil_scoped_release release;
        pbm::decode_payload(reinterpret_cast<const uint8_t*>(in), bytes,
                            reinterpret_cast<void*>(out), count,
                            static_cast<pbm::DType>(out_dtype), add, name_or_null(name));
      },
      py::arg("payload"), py::arg("bytes"), py::arg("out"), py::arg("count"), py::arg("out_dtype"),
      py::arg("add"), py::arg("name") = "");
}

// ---- kernels: fused optimizer updates and loss-scaling checks (pybrain_mpi/optim.py, amp.py)
#include "kernels/optimizers.h"
#include "kernels/parallel.h"

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
      [](std::uintptr_t grad, size_t count, int dtype, double scale, int num_threads) {
        py::gil_scoped_release release;
        if (static_cast<pbm::DType>(dtype) == pbm::DType::kFloat64)
          return pbm::unscale_and_check(reinterpret_cast<double*>(grad), count, scale, num_threads);
        if (static_cast<pbm::DType>(dtype) != pbm::DType::kFloat32)
          throw pbm::PbmError(std::string("unscale_and_check takes float32 or float64 gradients, not ") +
                              pbm::dtype_name(static_cast<pbm::DType>(dtype)));
        return pbm::unscale_and_check(reinterpret_cast<float*>(grad), count,
                                      static_cast<float>(scale), num_threads);
      },
      py::arg("grad"), py::arg("count"), py::arg("dtype"), py::arg("scale"), py::arg("num_threads"),
      "grad *= scale in place; returns True when every element is finite.");
  m.def(
      "sgd_step",
      [f32](std::uintptr_t param, std::uintptr_t grad, std::uintptr_t momentum_buffer, size_t count,
            double lr, double momentum, double dampening, double weight_decay, bool nesterov,
            bool momentum_initialized, double grad_scale, int num_threads) {
        py::gil_scoped_release release;
        const pbm::SgdParams p{lr, momentum, dampening, weight_decay, nesterov,
                               momentum_initialized, static_cast<float>(grad_scale)};
        pbm::sgd_step(f32(param), f32(grad), f32(momentum_buffer), count, p, num_threads);
      },
      py::arg("param"), py::arg("grad"), py::arg("momentum_buffer"), py::arg("count"),
      py::arg("lr"), py::arg("momentum"), py::arg("dampening"), py::arg("weight_decay"),
      py::arg("nesterov"), py::arg("momentum_initialized"), py::arg("grad_scale"),
      py::arg("num_threads"), "Fused torch.optim.SGD update over flat float32 buffers.");
  m.def(
      "adam_step",
      [f32](std::uintptr_t param, std::uintptr_t grad, std::uintptr_t exp_avg,
            std::uintptr_t exp_avg_sq, std::uintptr_t max_exp_avg_sq, size_t count, double lr,
            double beta1, double beta2, double eps, double weight_decay, bool decoupled_weight_decay,
            bool amsgrad, double step, double grad_scale, int num_threads) {
        py::gil_scoped_release release;
        const pbm::AdamParams p{lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay,
                                amsgrad, step, static_cast<float>(grad_scale)};
        pbm::adam_step(f32(param), f32(grad), f32(exp_avg), f32(exp_avg_sq), f32(max_exp_avg_sq),
                       count, p, num_threads);
      },
      py::arg("param"), py::arg("grad"), py::arg("exp_avg"), py::arg("exp_avg_sq"),
      py::arg("max_exp_avg_sq"), py::arg("count"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"),
      py::arg("eps"), py::arg("weight_decay"), py::arg("decoupled_weight_decay"), py::arg("amsgrad"),
      py::arg("step"), py::arg("grad_scale"), py::arg("num_threads"),
      "Fused torch.optim.Adam/AdamW update over flat float32 buffers.");
  m.def(
      "adagrad_step",
      [f32](std::uintptr_t param, std::uintptr_t grad, std::uintptr_t state_sum, size_t count,
            double lr, double lr_decay, double weight_decay, double eps, double step,
            double grad_scale, int num_threads) {
        py::gil_scoped_release release;
        const pbm::AdagradParams p{lr, lr_decay, weight_decay, eps, step,
                                   static_cast<float>(grad_scale)};
        pbm::adagrad_step(f32(param), f32(grad), f32(state_sum), count, p, num_threads);
      },
      py::arg("param"), py::arg("grad"), py::arg("state_sum"), py::arg("count"), py::arg("lr"),
      py::arg("lr_decay"), py::arg("weight_decay"), py::arg("eps"), py::arg("step"),
      py::arg("grad_scale"), py::arg("num_threads"),
      "Fused torch.optim.Adagrad update over flat float32 buffers.");
}

// Shared-memory node stage (csrc/collectives/shm_allreduce.*): methods added to Engine.
void bind_shm(py::module_& m) {
  auto engine = py::reinterpret_borrow<py::class_<pbm::Engine>>(m.attr("Engine"));
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
            return reinterpret_cast<std::uintptr_t>(stage.shared_alloc(bytes));
          },
          py::arg("bytes"), "Address of `bytes` in this rank's shared pool segment; collective over the node.")
      .def("shared_reset", [node](pbm::Engine& e) { node(e).shared_reset(); },
           "Makes all pool memory reusable (earlier shared buffers then alias new ones).")
      .def_property_readonly("shm_bytes", &pbm::Engine::shm_bytes)
      .def_property(
          "shm_min_bytes", [](pbm::Engine& e) { return e.shm_min_bytes; },
          [](pbm::Engine& e, size_t bytes) { e.shm_min_bytes = bytes; })
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
            layout["slices"] = stage.max_local_size();
            layout["node_world_ranks"] = stage.node_world_ranks();
            return layout;
          },
          "The node stage's view of the topology.")
      .def(
          "resolve_algorithm",
          [](pbm::Engine& e, int algorithm, size_t bytes) {
            return static_cast<int>(e.resolve_algorithm(static_cast<pbm::Algorithm>(algorithm), bytes));
          },
          py::arg("algorithm"), py::arg("bytes"), "The algorithm code an allreduce of `bytes` runs as.")
      .def(
          "threelc_state_sizes",
          [node](pbm::Engine& e, size_t count, int dtype) {
            pbm::NodeStage& stage = node(e);
            const auto type = static_cast<pbm::DType>(dtype);
            return py::make_tuple(stage.owned_elements(count, type),
                                  stage.owner_residual_elements(count, type));
          },
          py::arg("count"), py::arg("dtype"),
          "(first-stage, second-stage) residual elements of a compressed hierarchical allreduce.");
}

PYBIND11_MODULE(_core, m) {
  m.doc() = "pybrain-mpi native core: collectives over MPI (see pybrain_mpi for the API)";

  py::register_exception_translator([](std::exception_ptr pointer) {
    try {
      if (pointer) std::rethrow_exception(pointer);
    } catch (const pbm::CollectiveTimeoutError& error) {
      raise_python("CollectiveTimeout", error, &error.missing_ranks());
    } catch (const pbm::CollectiveMismatchError& error) {
      raise_python("CollectiveMismatch", error, nullptr);
    } catch (const pbm::PbmError& error) {
      raise_python("PbmError", error, nullptr);
    }
  });

  m.def("compiled_mpi_vendor", &compiled_mpi_vendor,
        "MPI implementation (and version) whose mpi.h this extension was compiled against.");
  m.def("mpi_library_version", &runtime_mpi_library_version,
        "MPI_Get_library_version() of the MPI library loaded in this process.");
  m.def("query_thread_level", &query_thread_level,
        "MPI_Query_thread(): the thread support level MPI was initialized with.");
  m.attr("MPI_THREAD_MULTIPLE") = static_cast<int>(MPI_THREAD_MULTIPLE);
  m.attr("MAX_INLINE_PAYLOAD_BYTES") = pbm::kMaxInlinePayloadBytes;

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

  py::class_<pbm::Engine>(m, "Engine", "Owns the duplicated communicator and progress thread.")
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
      .def_property(
          "ring_chunk_bytes", [](pbm::Engine& e) { return e.ring().chunk_bytes; },
          [](pbm::Engine& e, size_t bytes) { e.ring().chunk_bytes = bytes; })
      .def_property(
          "ring_window", [](pbm::Engine& e) { return e.ring().window; },
          [](pbm::Engine& e, int window) { e.ring().window = window; })
      .def(
          "allreduce",
          [](pbm::Engine& engine, std::uintptr_t address, size_t count, int dtype, int op,
             int algorithm, const std::string& name, bool async_op, double timeout_s,
             float sparsity, std::uintptr_t residual, std::uintptr_t owner_residual,
             bool half_wire, bool check_finite) {
            pbm::CollectiveSpec spec = make_spec(pbm::CollectiveKind::kAllreduce, address, count,
                                                 dtype, op, algorithm, 0, name);
            spec.half_wire = half_wire;
            spec.check_finite = check_finite;
            if (sparsity > 0) {
              spec.threelc = true;
              spec.sparsity = sparsity;
              spec.residual = reinterpret_cast<float*>(residual);
              spec.owner_residual = reinterpret_cast<float*>(owner_residual);
            }
            return start(engine, std::move(spec), async_op, timeout_s);
          },
          py::arg("address"), py::arg("count"), py::arg("dtype"), py::arg("op"),
          py::arg("algorithm"), py::arg("name"), py::arg("async_op"), py::arg("timeout_s"),
          py::arg("sparsity") = 0.0f, py::arg("residual") = 0, py::arg("owner_residual") = 0,
          py::arg("half_wire") = false, py::arg("check_finite") = false,
          "Allreduce; sparsity > 0 selects the two-stage 3LC-compressed algorithm; check_finite "
          "makes the returned Operation report finite().")
      .def(
          "broadcast",
          [](pbm::Engine& engine, std::uintptr_t address, size_t count, int dtype, int root,
             const std::string& name, bool async_op, double timeout_s) {
            return start(engine,
                         make_spec(pbm::CollectiveKind::kBroadcast, address, count, dtype, 0, 0,
                                   root, name),
                         async_op, timeout_s);
          },
          py::arg("address"), py::arg("count"), py::arg("dtype"), py::arg("root"), py::arg("name"),
          py::arg("async_op"), py::arg("timeout_s"))
      .def(
          "barrier",
          [](pbm::Engine& engine, double timeout_s) {
            return start(engine, make_spec(pbm::CollectiveKind::kBarrier, 0, 0, 0, 0, 0, 0, ""),
                         false, timeout_s);
          },
          py::arg("timeout_s"))
      .def(
          "shutdown",
          [](pbm::Engine& engine) {
            py::gil_scoped_release release;
            engine.shutdown();
          },
          "Stops the progress thread; queued collectives fail, a stuck one is aborted.");
  bind_compression(m);
  bind_kernels(m);
  bind_shm(m);
}
