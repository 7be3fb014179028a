// Registers the Engine as the TorchScript custom class torch.classes.layerskip.Engine.
#include "engine/engine.h"

TORCH_LIBRARY_FRAGMENT(layerskip, m) {
  using layerskip::engine::Engine;
  m.class_<Engine>("Engine")
      .def(torch::init([](c10::Dict<std::string, int64_t> config, double rms_norm_eps, at::Tensor cos_sin_cache,
                          c10::Dict<std::string, at::Tensor> weights, c10::Dict<std::string, int64_t> weight_formats,
                          std::string weight_dtype) {
        return Engine::create(config, rms_norm_eps, cos_sin_cache, weights, weight_formats, weight_dtype);
      }))
      .def("add_row", &Engine::add_row)
      .def("step", &Engine::step)
      .def("run", &Engine::run)
      .def("remove_row", &Engine::remove_row)
      .def("set_row_policy", &Engine::set_row_policy)
      .def("set_draft_vocab", &Engine::set_draft_vocab)
      .def("draft_vocab_size", &Engine::draft_vocab_size)
      .def("set_rope_table", &Engine::set_rope_table)
      .def("rope_positions", &Engine::rope_positions)
      .def("row_ids", &Engine::row_ids)
      .def("has_unfinished", &Engine::has_unfinished)
      .def("finish_reason", &Engine::finish_reason)
      .def("error", &Engine::error)
      .def("tokens", &Engine::tokens)
      .def("stats", &Engine::stats)
      .def("capacity", &Engine::capacity)
      .def("max_rows", &Engine::max_rows)
      .def("reserve", &Engine::reserve)
      .def("release_cache", &Engine::release_cache)
      .def("cache_bytes", &Engine::cache_bytes)
      .def("cache_bytes_for", &Engine::cache_bytes_for)
      .def("weight_bytes_per_token", &Engine::weight_bytes_per_token)
      .def("huge_page_bytes", &Engine::huge_page_bytes)
      .def("weight_read_seconds", &Engine::weight_read_seconds)
      .def("set_threads", &Engine::set_threads)
      .def("threads", &Engine::threads)
      .def("set_profiling", &Engine::set_profiling)
      .def("set_cuda_graphs", &Engine::set_cuda_graphs)
      .def("graph_replays", &Engine::graph_replays)
      .def("reset_profile", &Engine::reset_profile)
      .def("profile", &Engine::profile);
}
