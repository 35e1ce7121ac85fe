// trainer/train.cpp — msa train: the training loop (AdamW, warm-up + cosine LR, separate gradient
// clipping of the LM and the index branch, bf16 autocast on GPU), checkpoints with exact resume,
// progress line and JSON-lines metrics.
#include "train.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/grad_mode.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <sstream>

#include "msa/common.h"

namespace msa::train {

namespace {

std::string fmt(const char* f, double x) {
  char b[64];
  std::snprintf(b, sizeof b, f, x);
  return b;
}

std::string duration(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  const int64_t t = int64_t(s + 0.5);
  char b[32];
  if (t >= 3600)
    std::snprintf(b, sizeof b, "%lldh%02lldm", (long long)(t / 3600), (long long)(t / 60 % 60));
  else
    std::snprintf(b, sizeof b, "%lldm%02llds", (long long)(t / 60), (long long)(t % 60));
  return b;
}

// JSON number: finite values only, NaN/inf as null.
std::string num(double x) {
  if (!std::isfinite(x)) return "null";
  char b[32];
  std::snprintf(b, sizeof b, "%.6g", x);
  return b;
}

// Every TrainConfig / ModelConfig field, once, for the checkpoint header.
// clang-format off
#define MSA_TRAIN_FIELDS(X)                                                                          \
  X(seq_len) X(batch) X(steps) X(lr) X(min_lr_ratio) X(lr_warmup_steps) X(weight_decay) X(beta1)   \
  X(beta2) X(adam_eps) X(clip) X(index_lr) X(kl_lambda) X(warmup_tokens) X(retrieval_fraction)     \
  X(log_every) X(eval_every) X(save_every) X(valid_samples)
#define MSA_MODEL_FIELDS(X)                                                                          \
  X(vocab) X(d_model) X(n_layers) X(h_q) X(h_kv) X(d_head) X(d_idx) X(d_ff) X(dense_layers) X(bk)  \
  X(topk) X(rope_theta) X(norm_eps)
// clang-format on

template <class T>
void parse_into(T& x, const std::string& s) {
  if constexpr (std::is_floating_point_v<T>)
    x = std::stod(s);
  else
    x = T(std::stoll(s));
}

std::string to_text(double x) {
  char b[40];
  std::snprintf(b, sizeof b, "%.17g", x);
  return b;
}
std::string to_text(int64_t x) { return std::to_string(x); }

void write_tensor(std::ofstream& f, const std::string& name, const at::Tensor& t) {
  at::Tensor c = t.detach().to(at::kCPU).contiguous();
  f << name << ' ' << int(c.scalar_type()) << ' ' << c.dim();
  for (int64_t s : c.sizes()) f << ' ' << s;
  f << '\n';
  f.write(static_cast<const char*>(c.data_ptr()), std::streamsize(c.nbytes()));
  f << '\n';
}

std::pair<std::string, at::Tensor> read_tensor(std::ifstream& f, const std::string& path) {
  std::string line;
  if (!std::getline(f, line)) throw Error("msa checkpoint " + path + ": truncated (tensor header)");
  std::istringstream is(line);
  std::string name;
  int dtype = 0;
  int64_t dim = 0;
  is >> name >> dtype >> dim;
  std::vector<int64_t> sizes(dim);
  for (auto& s : sizes) is >> s;
  if (!is || dim < 0 || dim > 8) throw Error("msa checkpoint " + path + ": bad tensor header '" + line + "'");
  at::Tensor t = at::empty(sizes, at::ScalarType(dtype));
  f.read(static_cast<char*>(t.data_ptr()), std::streamsize(t.nbytes()));
  char nl = 0;
  f.get(nl);
  if (!f || nl != '\n') throw Error("msa checkpoint " + path + ": truncated data of " + name);
  return {name, t};
}

double grad_norm(const std::vector<at::Tensor>& ps) {
  double s = 0;
  for (auto& p : ps)
    if (p.grad().defined()) s += p.grad().to(at::kDouble).pow(2).sum().item<double>();
  return std::sqrt(s);
}

void clip(const std::vector<at::Tensor>& ps, double norm, double max_norm) {
  if (max_norm <= 0 || norm <= max_norm) return;
  const double scale = max_norm / (norm + 1e-6);
  for (auto& p : ps)
    if (p.grad().defined()) p.mutable_grad().mul_(scale);
}

}  // namespace

int train_impl(const TrainOptions& o);

Route parse_route(const std::string& s) {
  if (s == "dense") return Route::dense;
  if (s == "msa-pt") return Route::msa_pt;
  if (s == "msa-cpt") return Route::msa_cpt;
  throw Error("msa train: route '" + s + "', expected dense, msa-pt or msa-cpt");
}

const char* route_name(Route r) { return r == Route::dense ? "dense" : r == Route::msa_pt ? "msa-pt" : "msa-cpt"; }

TrainConfig resolve_config(const TrainOptions& o) {
  TrainConfig c = named_config(o.config);
  if (o.steps > 0) c.steps = o.steps;
  if (o.batch > 0) c.batch = o.batch;
  if (o.seq_len > 0) c.seq_len = o.seq_len;
  if (o.lr > 0) c.lr = c.index_lr = o.lr;
  if (o.index_lr > 0) c.index_lr = o.index_lr;
  if (o.kl_lambda >= 0) c.kl_lambda = o.kl_lambda;
  if (o.retrieval_fraction >= 0) c.retrieval_fraction = o.retrieval_fraction;
  if (o.log_every > 0) c.log_every = o.log_every;
  if (o.save_every >= 0) c.save_every = o.save_every;
  if (o.eval_every >= 0) c.eval_every = o.eval_every;
  if (o.valid_samples >= 0) c.valid_samples = o.valid_samples;
  if (o.topk > 0) c.model.topk = o.topk;
  if (o.dense_layers >= 0) c.model.dense_layers = o.dense_layers;
  c.lr_warmup_steps = std::min(c.lr_warmup_steps, std::max<int64_t>(1, c.steps / 10));
  if (o.warmup_tokens >= 0)
    c.warmup_tokens = o.warmup_tokens;
  else if (o.route != "dense")
    c.warmup_tokens = c.steps * c.batch * c.seq_len / 5;
  return c;
}

void save_checkpoint(const std::string& path, const Checkpoint& c) {
  namespace fs = std::filesystem;
  if (fs::path(path).has_parent_path()) fs::create_directories(fs::path(path).parent_path());
  const std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary);
    if (!f) throw Error("msa checkpoint: cannot write " + tmp);
    f << "msa-checkpoint 1\n";
    f << "name=" << c.cfg.name << "\nroute=" << route_name(c.route) << "\nseed=" << c.seed << "\nstep=" << c.step
      << "\ntokens=" << c.tokens << "\ncorpus=" << c.corpus << "\n";
    // Optional keys (older checkpoints lack them; the loader defaults them).
    f << "data_seed=" << c.data_seed << "\nroute_start_tokens=" << c.route_start_tokens << "\n";
#define X(n) f << "train." #n "=" << to_text(c.cfg.n) << "\n";
    MSA_TRAIN_FIELDS(X)
#undef X
#define X(n) f << "model." #n "=" << to_text(c.cfg.model.n) << "\n";
    MSA_MODEL_FIELDS(X)
#undef X
    f << "tensors=" << (c.params.size() + c.adam_m.size() + c.adam_v.size() + (c.rng_state.defined() ? 1 : 0))
      << "\nend\n";
    for (auto& [n, t] : c.params) write_tensor(f, "param:" + n, t);
    for (auto& [n, t] : c.adam_m) write_tensor(f, "adam_m:" + n, t);
    for (auto& [n, t] : c.adam_v) write_tensor(f, "adam_v:" + n, t);
    if (c.rng_state.defined()) write_tensor(f, "rng:cpu", c.rng_state);
    if (!f) throw Error("msa checkpoint: writing " + tmp + " failed");
  }
  // Atomic replace: an interrupted save never leaves a half-written checkpoint under the name.
  fs::rename(tmp, path);
}

Checkpoint load_checkpoint(const std::string& path, bool with_optimizer) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Error("msa checkpoint: cannot open " + path);
  std::string line;
  std::getline(f, line);
  if (line != "msa-checkpoint 1") throw Error("msa checkpoint " + path + ": not an msa checkpoint (version 1)");
  std::map<std::string, std::string> kv;
  while (std::getline(f, line) && line != "end") {
    auto eq = line.find('=');
    if (eq == std::string::npos) throw Error("msa checkpoint " + path + ": bad header line '" + line + "'");
    kv[line.substr(0, eq)] = line.substr(eq + 1);
  }
  if (line != "end") throw Error("msa checkpoint " + path + ": truncated header");
  auto get = [&](const std::string& k) -> const std::string& {
    auto it = kv.find(k);
    if (it == kv.end()) throw Error("msa checkpoint " + path + ": header lacks " + k);
    return it->second;
  };
  Checkpoint c;
  try {
    c.cfg.name = get("name");
    c.route = parse_route(get("route"));
    c.seed = std::stoull(get("seed"));
    c.step = std::stoll(get("step"));
    c.tokens = std::stoll(get("tokens"));
    c.corpus = get("corpus");
    c.data_seed = kv.count("data_seed") ? std::stoull(kv["data_seed"]) : c.seed;
    c.route_start_tokens = kv.count("route_start_tokens") ? std::stoll(kv["route_start_tokens"]) : 0;
#define X(n) parse_into(c.cfg.n, get("train." #n));
    MSA_TRAIN_FIELDS(X)
#undef X
#define X(n) parse_into(c.cfg.model.n, get("model." #n));
    MSA_MODEL_FIELDS(X)
#undef X
  } catch (const std::logic_error&) {
    throw Error("msa checkpoint " + path + ": unreadable header value");
  }
  const int64_t n = std::stoll(get("tensors"));
  for (int64_t i = 0; i < n; ++i) {
    auto [name, t] = read_tensor(f, path);
    auto colon = name.find(':');
    const std::string kind = name.substr(0, colon), pname = name.substr(colon + 1);
    if (kind == "param")
      c.params.push_back({pname, t});
    else if (!with_optimizer)
      continue;
    else if (kind == "adam_m")
      c.adam_m.push_back({pname, t});
    else if (kind == "adam_v")
      c.adam_v.push_back({pname, t});
    else if (kind == "rng")
      c.rng_state = t;
  }
  return c;
}

LM model_from_checkpoint(const Checkpoint& c, at::Device device, bool index_optional) {
  LM model(c.cfg.model, c.seed, device);
  at::NoGradGuard ng;
  for (auto& [name, t] : model.params()) {
    bool found = false;
    for (auto& [n2, t2] : c.params) {
      if (n2 != name) continue;
      if (t2.sizes() != t.sizes()) throw Error("msa checkpoint: parameter " + name + " has another shape");
      const_cast<at::Tensor&>(t).copy_(t2);
      found = true;
    }
    if (!found && !(index_optional && LM::is_index_param(name)))
      throw Error("msa checkpoint: parameter " + name + " missing");
  }
  return model;
}

data::Stream validation_stream(const data::Corpus& corpus, int64_t seq_len) {
  data::MixConfig mix;
  mix.seq_len = seq_len;
  return data::Stream(corpus, mix, kValidSeed, data::Split::valid);
}

Batch make_batch(const std::vector<data::Sample>& samples, at::Device device) {
  std::vector<int64_t> in, tg;
  std::vector<uint8_t> mask;
  std::vector<int32_t> cu{0};
  for (auto& s : samples) {
    const int64_t t = int64_t(s.tokens.size()) - 1;
    for (int64_t i = 0; i < t; ++i) {
      in.push_back(s.tokens[i]);
      tg.push_back(s.tokens[i + 1]);
    }
    mask.insert(mask.end(), s.answer_mask.begin(), s.answer_mask.end());
    mask.resize(in.size(), 0);
    cu.push_back(int32_t(in.size()));
  }
  Batch b;
  b.inputs = at::tensor(in, at::kLong).to(device);
  b.targets = at::tensor(tg, at::kLong).to(device);
  b.cu_seqlens = at::tensor(cu, at::kInt).to(device);
  b.answer_mask = at::tensor(mask, at::kByte).to(device);
  return b;
}

Batch make_batch(const data::Stream& stream, int64_t first_index, int64_t batch, at::Device device) {
  std::vector<data::Sample> s;
  for (int64_t i = 0; i < batch; ++i) s.push_back(stream.sample(first_index + i));
  return make_batch(s, device);
}

double lr_at(const TrainConfig& c, int64_t step, double peak) {
  if (step < c.lr_warmup_steps) return peak * double(step + 1) / double(c.lr_warmup_steps);
  const double t = double(step - c.lr_warmup_steps) / double(std::max<int64_t>(1, c.steps - c.lr_warmup_steps));
  const double cosine = 0.5 * (1.0 + std::cos(M_PI * std::min(1.0, t)));
  return peak * (c.min_lr_ratio + (1.0 - c.min_lr_ratio) * cosine);
}

AttnMode mode_at(Route r, int64_t tokens_before_step, int64_t warmup_tokens) {
  if (r == Route::dense) return AttnMode::dense;
  return tokens_before_step < warmup_tokens ? AttnMode::warmup : AttnMode::sparse;
}

at::Device parse_device(const std::string& s) {
  if (s == "cpu") return at::Device(at::kCPU);
  if (s == "cuda") {
#ifndef MSA_TRAINER_CUDA
    throw Error(
        "msa: --device cuda, but this build of the trainer has no CUDA (torch with CUDA and -DMSA_WITH_CUDA=ON "
        "needed)");
#else
    if (!at::hasCUDA()) throw Error("msa: --device cuda, but torch sees no CUDA device");
    return at::Device(at::kCUDA, 0);
#endif
  }
  throw Error("msa: device '" + s + "', expected cpu or cuda");
}

void set_threads(int threads) {
  if (threads > 0) at::set_num_threads(threads);
}

ValidLoss validation_loss(const LM& model, const data::Stream& valid, int64_t samples, AttnMode mode, int64_t tail) {
  at::NoGradGuard ng;
  ValidLoss r;
  double sum_all = 0, sum_tail = 0;
  int64_t n_all = 0;
  const bool cuda = model.device().is_cuda();
  for (int64_t i = 0; i < samples; ++i) {
    Batch b = make_batch(valid, i, 1, model.device());
    if (cuda) {
      // bf16 as in training: msa eval reaches here before anything else set the autocast dtype
      // (torch's default is float16, which the bf16 msa kernels' outputs then meet in a matmul).
      at::autocast::set_autocast_dtype(at::kCUDA, at::kBFloat16);
      at::autocast::set_autocast_enabled(at::kCUDA, true);
    }
    ForwardOut out = model.forward(b.inputs, b.cu_seqlens, mode, false);
    if (cuda) {
      at::autocast::set_autocast_enabled(at::kCUDA, false);
      at::autocast::clear_cache();
    }
    at::Tensor nll = at::cross_entropy_loss(out.logits, b.targets, {}, at::Reduction::None).to(at::kDouble);
    const int64_t t = nll.size(0), k = std::min(tail, t);
    sum_all += nll.sum().item<double>();
    sum_tail += nll.narrow(0, t - k, k).sum().item<double>();
    n_all += t;
    r.tail_tokens += k;
  }
  r.all = n_all ? sum_all / double(n_all) : NAN;
  r.tail = r.tail_tokens ? sum_tail / double(r.tail_tokens) : NAN;
  return r;
}

// Messages that already name their function ("msa train: ...", "msa::sparse_attention_bwd: ...")
// are printed as they are.
static void print_error(const char* cmd, const char* what) {
  if (std::strncmp(what, "msa", 3) == 0)
    std::fprintf(stderr, "%s\n", what);
  else
    std::fprintf(stderr, "msa %s: %s\n", cmd, what);
}

int report_errors(const char* cmd, const std::function<int()>& body) {
  try {
    return body();
  } catch (const c10::Error& e) {
    print_error(cmd, e.what_without_backtrace());
  } catch (const std::exception& e) {
    print_error(cmd, e.what());
  }
  return 1;
}

int run_train(const TrainOptions& o) {
  return report_errors("train", [&] { return train_impl(o); });
}

int train_impl(const TrainOptions& o) {
  namespace fs = std::filesystem;
  set_threads(o.threads);
  const at::Device device = parse_device(o.device);
  const bool cuda = device.is_cuda();
  if (cuda) at::autocast::set_autocast_dtype(at::kCUDA, at::kBFloat16);

  Checkpoint st;
  Route route = parse_route(o.route);
  if (!o.resume.empty()) {
    st = load_checkpoint(o.resume);
    route = st.route;
    if (o.steps > 0) st.cfg.steps = o.steps;  // lengthening a finished run is allowed
  } else {
    st.cfg = resolve_config(o);
    st.route = route;
    st.seed = o.seed;
    st.data_seed = o.data_seed >= 0 ? uint64_t(o.data_seed) : o.seed;
    st.corpus = o.corpus;
  }
  if (o.continue_schedule && (route != Route::msa_cpt || !o.resume.empty()))
    throw Error("msa train: --continue-schedule applies to a new msa-cpt run (--route msa-cpt --init ...)");
  TrainConfig& cfg = st.cfg;
  if (route == Route::msa_cpt && o.resume.empty() && o.init.empty())
    throw Error("msa train: --route msa-cpt needs --init DENSE_CHECKPOINT");

  const data::Corpus corpus = data::Corpus::load(st.corpus);
  data::MixConfig mix;
  mix.seq_len = cfg.seq_len;
  mix.retrieval_fraction = cfg.retrieval_fraction;
  const data::Stream train(corpus, mix, st.data_seed, data::Split::train);
  const data::Stream valid = validation_stream(corpus, cfg.seq_len);

  LM model(cfg.model, st.seed, device);
  std::vector<at::Tensor> m, v;
  {
    at::NoGradGuard ng;
    if (!o.resume.empty()) {
      model = model_from_checkpoint(st, device);
    } else if (route == Route::msa_cpt) {
      // MSA-CPT: the dense model's weights, fresh index projections (a dense checkpoint's index
      // tensors were never trained), optimizer state from zero.
      Checkpoint dense = load_checkpoint(o.init, false);
      if (dense.route != Route::dense) throw Error("msa train: --init " + o.init + " is not a dense checkpoint");
      // The architecture is the checkpoint's; the selection (topk, dense_layers) is this run's.
      ModelConfig mc = dense.cfg.model;
      mc.topk = cfg.model.topk;
      mc.dense_layers = cfg.model.dense_layers;
      cfg.model = mc;
      dense.cfg.model = mc;
      dense.seed = st.seed;
      model = model_from_checkpoint(dense, device, true);
      model.reset_index_params(st.seed + 77);
      if (o.continue_schedule) {
        // The last part of the dense run's schedule with sparse attention: same steps, LR, data
        // (the dense run's data seed) and LM optimizer state; the index's moments start at zero.
        if (dense.step >= cfg.steps)
          throw Error("msa train: --continue-schedule: " + o.init + " is at step " + std::to_string(dense.step) +
                      ", not before --steps " + std::to_string(cfg.steps));
        Checkpoint full = load_checkpoint(o.init, true);
        st.step = full.step;
        st.tokens = full.tokens;
        st.route_start_tokens = full.tokens;
        st.data_seed = full.data_seed;
        for (auto& [n2, t] : full.adam_m)
          if (!LM::is_index_param(n2)) st.adam_m.push_back({n2, t});
        for (auto& [n2, t] : full.adam_v)
          if (!LM::is_index_param(n2)) st.adam_v.push_back({n2, t});
      }
    }
    for (auto& [name, p] : model.params()) {
      auto find = [&](const std::vector<std::pair<std::string, at::Tensor>>& list) {
        for (auto& [n2, t] : list)
          if (n2 == name) return t.to(device);
        return at::zeros_like(p);
      };
      m.push_back(find(st.adam_m).clone());
      v.push_back(find(st.adam_v).clone());
    }
    if (!o.resume.empty() && st.rng_state.defined()) {
      at::Generator gen = at::detail::getDefaultCPUGenerator();
      std::lock_guard<std::mutex> lock(gen.mutex());
      gen.set_state(st.rng_state);
    }
  }
  std::vector<at::Tensor> lm_params, idx_params;
  for (auto& [name, p] : model.params()) (LM::is_index_param(name) ? idx_params : lm_params).push_back(p);

  fs::create_directories(o.out);
  std::ofstream metrics(fs::path(o.out) / "metrics.jsonl", o.resume.empty() ? std::ios::trunc : std::ios::app);
  std::ofstream log(fs::path(o.out) / "log.txt", o.resume.empty() ? std::ios::trunc : std::ios::app);
  const int64_t tok_per_step = cfg.batch * cfg.seq_len;
  {
    std::ostringstream head;
    head << "msa train: config " << cfg.name << ", route " << route_name(route) << ", device " << device.str()
         << ", threads " << at::get_num_threads() << "\n  model: " << describe(cfg.model)
         << "\n  params: " << model.num_params(false) << " (+" << model.num_params(true) - model.num_params(false)
         << " index)"
         << "\n  data: " << corpus.source << ", seq_len " << cfg.seq_len << ", batch " << cfg.batch << ", retrieval "
         << cfg.retrieval_fraction << "\n  steps " << cfg.steps << " (" << cfg.steps * tok_per_step << " tokens)";
    if (route != Route::dense) head << ", warm-up " << cfg.warmup_tokens << " tokens, kl_lambda " << cfg.kl_lambda;
    if (!o.resume.empty()) head << "\n  resumed at step " << st.step << " from " << o.resume;
    if (st.route_start_tokens > 0) head << "\n  continues " << o.init << " from step " << st.step;
    head << "\n";
    std::fputs(head.str().c_str(), stderr);
    log << head.str();
  }

  const bool tty = isatty(2) && !o.quiet;
  const double b1 = cfg.beta1, b2 = cfg.beta2;
  auto t0 = std::chrono::steady_clock::now();
  const int64_t first_step = st.step;
  const int64_t last_step = o.stop_at > 0 ? std::min(cfg.steps, o.stop_at) : cfg.steps;
  double kl_last = NAN;
  auto checkpoint = [&](const std::string& file) {
    st.params = model.params();
    st.adam_m.clear();
    st.adam_v.clear();
    for (size_t i = 0; i < model.params().size(); ++i) {
      st.adam_m.push_back({model.params()[i].first, m[i]});
      st.adam_v.push_back({model.params()[i].first, v[i]});
    }
    st.rng_state = at::detail::getDefaultCPUGenerator().get_state();
    save_checkpoint((fs::path(o.out) / file).string(), st);
  };

  for (; st.step < last_step; ++st.step) {
    const int64_t step = st.step;
    const AttnMode mode = mode_at(route, st.tokens - st.route_start_tokens, cfg.warmup_tokens);
    const bool log_step = step == 0 || (step + 1) % cfg.log_every == 0 || step + 1 == cfg.steps;
    Batch b = make_batch(train, step * cfg.batch, cfg.batch, device);
    if (cuda) at::autocast::set_autocast_enabled(at::kCUDA, true);
    ForwardOut out = model.forward(b.inputs, b.cu_seqlens, mode, log_step && mode != AttnMode::dense);
    at::Tensor lm = at::cross_entropy_loss(out.logits, b.targets);
    if (cuda) {
      at::autocast::set_autocast_enabled(at::kCUDA, false);
      at::autocast::clear_cache();
    }
    at::Tensor loss = mode == AttnMode::dense ? lm : lm + cfg.kl_lambda * out.kl.to(lm.scalar_type());
    loss.backward();
    // The KL gradient reaches only the index branch; clipping the two groups separately keeps a
    // large KL gradient from shrinking the LM's update (and the other way round).
    const double gn = grad_norm(lm_params), gn_idx = grad_norm(idx_params);
    clip(lm_params, gn, cfg.clip);
    clip(idx_params, gn_idx, cfg.clip);
    const double lr = lr_at(cfg, step, cfg.lr), lr_idx = lr_at(cfg, step, cfg.index_lr);
    {
      at::NoGradGuard ng;
      const double t = double(step + 1), bc1 = 1 - std::pow(b1, t), bc2 = 1 - std::pow(b2, t);
      for (size_t i = 0; i < model.params().size(); ++i) {
        const auto& [name, p] = model.params()[i];
        if (!p.grad().defined()) continue;
        const at::Tensor& g = p.grad();
        const double plr = LM::is_index_param(name) ? lr_idx : lr;
        m[i].mul_(b1).add_(g, 1 - b1);
        v[i].mul_(b2).addcmul_(g, g, 1 - b2);
        at::Tensor denom = (v[i] / std::sqrt(bc2)).sqrt_().add_(cfg.adam_eps);
        if (p.dim() == 2) const_cast<at::Tensor&>(p).mul_(1 - plr * cfg.weight_decay);
        const_cast<at::Tensor&>(p).addcdiv_(m[i], denom, -plr / bc1);
        const_cast<at::Tensor&>(p).mutable_grad().reset();
      }
    }
    st.tokens += tok_per_step;

    const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const double tok_s = double((step + 1 - first_step) * tok_per_step) / std::max(elapsed, 1e-9);
    const double eta = elapsed / double(step + 1 - first_step) * double(last_step - step - 1);
    if (log_step) {
      const double lm_v = lm.item<double>();
      const double kl_v = mode == AttnMode::dense ? NAN : out.kl.item<double>();
      if (std::isfinite(kl_v)) kl_last = kl_v;
      std::ostringstream js;
      js << "{\"step\": " << step + 1 << ", \"tokens\": " << st.tokens << ", \"phase\": \"" << mode_name(mode)
         << "\", \"loss\": " << num(std::isfinite(kl_v) ? lm_v + cfg.kl_lambda * kl_v : lm_v)
         << ", \"lm_loss\": " << num(lm_v) << ", \"kl\": " << num(kl_v) << ", \"lr\": " << num(lr)
         << ", \"grad_norm\": " << num(gn) << ", \"index_grad_norm\": " << num(gn_idx)
         << ", \"tokens_per_s\": " << num(tok_s) << ", \"elapsed_s\": " << num(elapsed) << "}\n";
      metrics << js.str();
      metrics.flush();
      std::string line = "step " + std::to_string(step + 1) + "/" + std::to_string(cfg.steps) + " " + mode_name(mode) +
                         " loss " + fmt("%.4f", lm_v) + " kl " +
                         (std::isfinite(kl_last) ? fmt("%.4f", kl_last) : std::string("-")) + " lr " + fmt("%.2e", lr) +
                         " " + fmt("%.0f", tok_s) + " tok/s ETA " + duration(eta);
      log << line << "\n";
      log.flush();
      if (!o.quiet) {
        if (tty) {
          const int width = 20, filled = int(width * double(step + 1) / double(cfg.steps));
          std::fprintf(stderr, "\r[%s%s] %s   ", std::string(filled, '#').c_str(),
                       std::string(width - filled, ' ').c_str(), line.c_str());
        } else {
          std::fprintf(stderr, "%s\n", line.c_str());
        }
      }
    }
    if (cfg.eval_every > 0 && cfg.valid_samples > 0 && (step + 1) % cfg.eval_every == 0 && step + 1 < cfg.steps) {
      // The attention the model trains with now (warm-up steps: dense; the index is not ready).
      const AttnMode vm = mode == AttnMode::sparse ? AttnMode::sparse : AttnMode::dense;
      ValidLoss vl = validation_loss(model, valid, cfg.valid_samples, vm, std::min<int64_t>(2048, cfg.seq_len / 4));
      metrics << "{\"step\": " << step + 1 << ", \"tokens\": " << st.tokens << ", \"val_loss\": " << num(vl.all)
              << ", \"val_loss_tail\": " << num(vl.tail) << "}\n";
      metrics.flush();
    }
    if (cfg.save_every > 0 && (step + 1) % cfg.save_every == 0 && step + 1 < last_step) {
      // The checkpoint records the steps done, this one included (the loop increments st.step
      // after the body), as the one written after the loop does; else a resume would redo it.
      st.step = step + 1;
      checkpoint("step-" + std::to_string(step + 1) + ".ckpt");
      st.step = step;
    }
  }
  if (tty) std::fputc('\n', stderr);

  if (st.step < cfg.steps) {
    checkpoint("step-" + std::to_string(st.step) + ".ckpt");
    std::fprintf(stderr, "msa train: stopped after step %lld: %s\n", (long long)st.step,
                 (fs::path(o.out) / ("step-" + std::to_string(st.step) + ".ckpt")).c_str());
    return 0;
  }
  checkpoint("final.ckpt");
  if (cfg.valid_samples > 0) {
    const AttnMode eval_mode = route == Route::dense ? AttnMode::dense : AttnMode::sparse;
    ValidLoss vl =
        validation_loss(model, valid, cfg.valid_samples, eval_mode, std::min<int64_t>(2048, cfg.seq_len / 4));
    metrics << "{\"step\": " << st.step << ", \"tokens\": " << st.tokens << ", \"val_loss\": " << num(vl.all)
            << ", \"val_loss_tail\": " << num(vl.tail) << "}\n";
    std::string line = "validation (" + std::string(mode_name(eval_mode)) + "): loss " + fmt("%.4f", vl.all) +
                       ", last " + std::to_string(vl.tail_tokens / cfg.valid_samples) + " tokens " +
                       fmt("%.4f", vl.tail);
    std::fprintf(stderr, "%s\n", line.c_str());
    log << line << "\n";
  }
  const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::fprintf(stderr, "msa train: done in %s, %s\n", duration(elapsed).c_str(),
               (fs::path(o.out) / "final.ckpt").c_str());
  return 0;
}

}  // namespace msa::train
