// Registers the Engine as the TorchScript custom class torch.classes.layerskip.Engine.
#include "engine/engine.h"

TORCH_LIBRARY_FRAGMENT(layerskip, m) {
  using layerskip::engine::Engine;
  m.class_<Engine>("Engine")
      .def(torch::init<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, double, at::Tensor,
                       std::vector<at::Tensor>, std::string, int64_t>())
      .def("begin", &Engine::begin)
      .def("step", &Engine::step)
      .def("finished", &Engine::finished)
      .def("finish_reason", &Engine::finish_reason)
      .def("tokens", &Engine::tokens)
      .def("stats", &Engine::stats)
      .def("capacity", &Engine::capacity)
      .def("weight_bytes_per_token", &Engine::weight_bytes_per_token)
      .def("set_profiling", &Engine::set_profiling)
      .def("reset_profile", &Engine::reset_profile)
      .def("profile", &Engine::profile);
}
