// trainer/eval.cpp — msa eval (validation loss, retrieval accuracy, selection recall of
// checkpoints side by side, text table and JSON) and msa viz (selection heat-map, metric curves).
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/grad_mode.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>

#include "msa/common.h"
#include "msa_torch.h"
#include "train.h"
#include "viz.h"

namespace msa::train {

namespace {

std::string f4(double x) {
  if (!std::isfinite(x)) return "-";
  char b[32];
  std::snprintf(b, sizeof b, "%.4f", x);
  return b;
}

std::string jnum(double x) {
  if (!std::isfinite(x)) return "null";
  char b[32];
  std::snprintf(b, sizeof b, "%.6g", x);
  return b;
}

std::string jstr(const std::string& s) {
  std::string r = "\"";
  for (char ch : s) {
    if (ch == '"' || ch == '\\') r += '\\';
    r += ch;
  }
  return r + "\"";
}

// Forward under bf16 autocast on GPU, no gradient.
ForwardOut infer(const LM& model, const at::Tensor& tokens, const at::Tensor& cu, AttnMode mode, Trace* trace) {
  at::NoGradGuard ng;
  const bool cuda = model.device().is_cuda();
  if (cuda) {
    at::autocast::set_autocast_dtype(at::kCUDA, at::kBFloat16);
    at::autocast::set_autocast_enabled(at::kCUDA, true);
  }
  ForwardOut out = model.forward(tokens, cu, mode, false, trace);
  if (cuda) {
    at::autocast::set_autocast_enabled(at::kCUDA, false);
    at::autocast::clear_cache();
  }
  return out;
}

// The "sink + local window" selection a static sparse pattern would make: block 0 and the
// query's most recent blocks, topk in all; the recall it reaches is the bar a learned index must
// clear. [n, h_kv, topk] int32, ascending, -1 padded.
at::Tensor static_selection(int64_t n, int64_t h_kv, int64_t topk, int64_t bk) {
  at::Tensor t = at::full({n, h_kv, topk}, -1, at::kInt);
  int32_t* p = t.data_ptr<int32_t>();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t b = i / bk;
    std::vector<int32_t> sel;
    if (b + 1 <= topk) {
      for (int64_t j = 0; j <= b; ++j) sel.push_back(int32_t(j));
    } else {
      sel.push_back(0);
      for (int64_t j = b - topk + 2; j <= b; ++j) sel.push_back(int32_t(j));
    }
    for (int64_t r = 0; r < h_kv; ++r)
      for (size_t s = 0; s < sel.size(); ++s) p[(i * h_kv + r) * topk + int64_t(s)] = sel[s];
  }
  return t;
}

struct Acc {
  int64_t right = 0, total = 0;
  double rate() const { return total ? double(right) / double(total) : NAN; }
};

struct Result {
  std::string path, label, route, mode;
  ValidLoss vl;
  int64_t seq_len = 0;
  Acc overall;
  Acc tokens;  // answer tokens right, a finer signal than whole answers early in training
  std::map<std::string, Acc> by_task;
  std::map<int64_t, Acc> by_ctx;
  std::map<double, Acc> by_depth;
  std::vector<std::pair<double, double>> recall;         // per layer (block, score); NaN for dense layers
  std::vector<std::pair<double, double>> static_recall;  // per layer, sink + local window  // Per MSA layer, over the recall queries: the KL on the selected support as training computes it
  // on this device (saved lse's), the same recomputed by the CPU reference (float32 copies), and
  // the CPU's KL over the whole causal prefix (what the warm-up trains); NaN for dense layers.
  struct Kl {
    double sparse_dev = NAN, sparse_cpu = NAN, full_cpu = NAN;
  };
  std::vector<Kl> kl;
};

std::string label_of(const std::string& path) {
  std::string p = path;
  auto slash = p.find_last_of('/');
  std::string file = slash == std::string::npos ? p : p.substr(slash + 1);
  if (slash != std::string::npos && (file == "final.ckpt" || file.ends_with(".ckpt"))) {
    std::string dir = p.substr(0, slash);
    auto s2 = dir.find_last_of('/');
    std::string d = s2 == std::string::npos ? dir : dir.substr(s2 + 1);
    return file == "final.ckpt" ? d : d + "/" + file;
  }
  return file;
}

}  // namespace

int run_eval(const EvalOptions& o) {
  return report_errors("eval", [&] {
    set_threads(o.threads);
    const at::Device device = parse_device(o.device);
    const std::vector<data::Task> tasks = data::parse_tasks(o.tasks);
    std::vector<Result> results;
    for (const std::string& path : o.checkpoints) {
      Checkpoint ck = load_checkpoint(path, false);
      LM model = model_from_checkpoint(ck, device);
      const ModelConfig& mc = model.config();
      Result r;
      r.path = path;
      r.label = label_of(path);
      r.route = route_name(ck.route);
      AttnMode mode = ck.route == Route::dense ? AttnMode::dense : AttnMode::sparse;
      if (o.mode == "dense") mode = AttnMode::dense;
      if (o.mode == "sparse") {
        if (ck.route == Route::dense)
          throw Error("msa eval: --mode sparse, but " + path + " is a dense checkpoint (no trained index)");
        mode = AttnMode::sparse;
      }
      r.mode = mode_name(mode);
      const data::Corpus corpus = data::Corpus::load(o.corpus.empty() ? ck.corpus : o.corpus);
      r.seq_len = o.seq_len > 0 ? o.seq_len : ck.cfg.seq_len;
      std::fprintf(stderr, "msa eval: %s (%s, %s attention, %lld tokens)\n", path.c_str(), r.route.c_str(),
                   r.mode.c_str(), (long long)r.seq_len);

      // Validation loss: all targets, and the last quarter (at most 2K) where long context matters.
      const data::Stream valid = validation_stream(corpus, r.seq_len);
      r.vl = validation_loss(model, valid, o.valid_samples, mode, std::min<int64_t>(2048, r.seq_len / 4));

      // Retrieval: teacher-forced argmax at every answer position (equal to greedy decoding).
      std::vector<int64_t> contexts = o.contexts;
      if (contexts.empty()) contexts = {r.seq_len / 2, r.seq_len};
      for (data::Task task : tasks)
        for (int64_t ctx : contexts)
          for (double depth : o.depths)
            for (int64_t c = 0; c < o.cases; ++c) {
              const uint64_t seed = o.seed * 1000003ull + uint64_t(c) * 7919ull + uint64_t(ctx) * 31ull +
                                    uint64_t(depth * 1000) * 17ull + uint64_t(task) * 101ull;
              data::RetrievalCase rc = data::make_retrieval(corpus, task, ctx, depth, seed, data::Split::valid);
              std::vector<int32_t> all = rc.prompt;
              all.insert(all.end(), rc.answer.begin(), rc.answer.end());
              std::vector<int64_t> in(all.begin(), all.end() - 1);
              const int64_t n = int64_t(in.size());
              at::Tensor tok = at::tensor(in, at::kLong).to(device);
              at::Tensor cu = at::tensor(std::vector<int32_t>{0, int32_t(n)}, at::kInt).to(device);
              at::Tensor pred = infer(model, tok, cu, mode, nullptr).logits.argmax(-1).to(at::kCPU);
              const int64_t* pp = pred.data_ptr<int64_t>();
              bool ok = true;
              for (size_t a = 0; a < rc.answer.size(); ++a) {
                const bool hit = pp[int64_t(rc.prompt.size()) - 1 + int64_t(a)] == rc.answer[a];
                ok = ok && hit;
                r.tokens.right += hit;
                r.tokens.total += 1;
              }
              for (Acc* acc : {&r.overall, &r.by_task[data::task_name(task)], &r.by_ctx[ctx], &r.by_depth[depth]}) {
                acc->right += ok;
                acc->total += 1;
              }
            }

      // Selection recall per layer on the first validation sequence: the index's choice (MSA
      // checkpoints) and the static sink + local window, both against the main branch's top-k.
      {
        Batch b = make_batch(valid, 0, 1, device);
        Trace trace;
        const bool has_index = ck.route != Route::dense;
        infer(model, b.inputs, b.cu_seqlens, has_index ? AttnMode::sparse : AttnMode::dense, &trace);
        // The last m queries against all keys (bottom-right aligned chunk): the metric's cost is
        // m * n, so long contexts stay affordable. selection_recall runs on the CPU reference
        // (float32 copies; said once on stderr for GPU runs): it is a metric, not a training op.
        const int64_t n = b.inputs.size(0), m = std::min<int64_t>(n, o.recall_queries);
        if (device.is_cuda() && results.empty())
          std::fprintf(stderr, "msa eval: selection recall is computed on the CPU (float32 copies of q, k)\n");
        at::Tensor stat = static_selection(n, mc.h_kv, mc.topk, mc.bk).narrow(0, n - m, m);
        at::Tensor cu_q = at::tensor(std::vector<int32_t>{0, int32_t(m)}, at::kInt);
        at::Tensor cu_k = at::tensor(std::vector<int32_t>{0, int32_t(n)}, at::kInt);
        for (int64_t l = 0; l < mc.n_layers; ++l) {
          const LayerTrace& t = trace[l];
          at::Tensor q = t.q.narrow(0, n - m, m).to(at::kCPU, at::kFloat), k = t.k.to(at::kCPU, at::kFloat);
          auto rec = [&](const at::Tensor& sel) -> std::pair<double, double> {
            at::Tensor s = sel.narrow(0, sel.size(0) - m, m).to(at::kCPU).contiguous();
            auto [blk, sc, rb, rs] = msa_torch::selection_recall(q, k, s, cu_q, cu_k, std::nullopt, mc.bk, 0.0);
            return {blk.item<double>(), sc.item<double>()};
          };
          r.recall.push_back(t.topk_idx.defined() ? rec(t.topk_idx) : std::pair<double, double>{NAN, NAN});
          r.static_recall.push_back(rec(stat));
          Result::Kl kl;
          if (t.topk_idx.defined() && t.q_idx.defined()) try {
            // The training path (index_topk's index lse, the sparse forward's lse) on the device,
            // on the chunk of the last m queries, against the CPU reference recomputing both.
            at::Tensor qd = t.q.narrow(0, n - m, m).contiguous(), qid = t.q_idx.narrow(0, n - m, m).contiguous();
            at::Tensor cq = cu_q.to(device), ck = cu_k.to(device);
            auto [sel, scores, ilse] = msa_torch::index_topk(qid, t.k_idx, cq, ck, std::nullopt, mc.bk, mc.topk, 0.0,
                                                             false, true, std::nullopt);
            at::Tensor lse = std::get<1>(msa_torch::sparse_attention_fwd(qd, t.k, t.v, sel, cq, ck, std::nullopt, mc.bk, 0.0));
            kl.sparse_dev = msa_torch::index_kl_loss(qd, t.k, qid, t.k_idx, sel, cq, ck, std::nullopt, lse, ilse, mc.bk,
                                                     0.0, 0.0)
                                .item<double>();
            at::Tensor qi = qid.to(at::kCPU, at::kFloat), ki = t.k_idx.to(at::kCPU, at::kFloat);
            kl.sparse_cpu = msa_torch::index_kl_loss(q, k, qi, ki, sel.to(at::kCPU), cu_q, cu_k, std::nullopt,
                                                     std::nullopt, std::nullopt, mc.bk, 0.0, 0.0)
                                .item<double>();
            kl.full_cpu = msa_torch::index_kl_loss(q, k, qi, ki, std::nullopt, cu_q, cu_k, std::nullopt, std::nullopt,
                                                   std::nullopt, mc.bk, 0.0, 0.0)
                              .item<double>();
          } catch (const std::exception& e) {
            // A diagnostic: its failure is reported and leaves the other metrics standing.
            std::fprintf(stderr, "msa eval: layer %lld KL diagnostic failed: %s\n", (long long)l, e.what());
          }
          r.kl.push_back(kl);
        }
      }
      results.push_back(std::move(r));
    }

    // The table: one column per checkpoint.
    std::vector<std::pair<std::string, std::vector<std::string>>> rows;
    auto row = [&](const std::string& name, auto&& cell) {
      std::vector<std::string> cells;
      for (auto& r : results) cells.push_back(cell(r));
      rows.push_back({name, cells});
    };
    auto acc_cell = [](const Acc& a) {
      if (!a.total) return std::string("-");
      char b[48];
      std::snprintf(b, sizeof b, "%.3f (%lld/%lld)", a.rate(), (long long)a.right, (long long)a.total);
      return std::string(b);
    };
    row("route", [](const Result& r) { return r.route; });
    row("attention at eval", [](const Result& r) { return r.mode; });
    row("val loss (all tokens)", [](const Result& r) { return f4(r.vl.all); });
    row("val loss (last quarter, <= 2K)", [](const Result& r) { return f4(r.vl.tail); });
    row("retrieval accuracy (whole answers)", [&](const Result& r) { return acc_cell(r.overall); });
    for (data::Task t : tasks)
      row(std::string("  ") + data::task_name(t), [&](const Result& r) {
        auto it = r.by_task.find(data::task_name(t));
        return it == r.by_task.end() ? std::string("-") : acc_cell(it->second);
      });
    row("retrieval answer tokens right", [&](const Result& r) { return acc_cell(r.tokens); });
    std::map<int64_t, int> all_ctx;
    std::map<double, int> all_depth;
    for (auto& r : results) {
      for (auto& [c, a] : r.by_ctx) all_ctx[c] = 1;
      for (auto& [d, a] : r.by_depth) all_depth[d] = 1;
    }
    for (auto& [ctx, one] : all_ctx)
      row("  context " + std::to_string(ctx), [&](const Result& r) {
        auto it = r.by_ctx.find(ctx);
        return it == r.by_ctx.end() ? std::string("-") : acc_cell(it->second);
      });
    for (auto& [depth, one] : all_depth) {
      char name[32];
      std::snprintf(name, sizeof name, "  depth %.2f", depth);
      row(name, [&](const Result& r) {
        auto it = r.by_depth.find(depth);
        return it == r.by_depth.end() ? std::string("-") : acc_cell(it->second);
      });
    }
    size_t n_layers = 0;
    for (auto& r : results) n_layers = std::max(n_layers, r.recall.size());
    auto pair_cell = [](const std::vector<std::pair<double, double>>& v, size_t l) {
      if (l >= v.size() || !std::isfinite(v[l].first)) return std::string("-");
      return f4(v[l].first) + " / " + f4(v[l].second);
    };
    for (size_t l = 0; l < n_layers; ++l)
      row("recall L" + std::to_string(l) + " index (block / score)",
          [&](const Result& r) { return pair_cell(r.recall, l); });
    for (size_t l = 0; l < n_layers; ++l)
      row("recall L" + std::to_string(l) + " sink+local (block / score)",
          [&](const Result& r) { return pair_cell(r.static_recall, l); });
    for (size_t l = 0; l < n_layers; ++l)
      row("KL L" + std::to_string(l) + " support: device / cpu; full prefix", [&](const Result& r) {
        if (l >= r.kl.size() || !std::isfinite(r.kl[l].sparse_cpu)) return std::string("-");
        return f4(r.kl[l].sparse_dev) + " / " + f4(r.kl[l].sparse_cpu) + "; " + f4(r.kl[l].full_cpu);
      });

    size_t w0 = 0;
    for (auto& [n, c] : rows) w0 = std::max(w0, n.size());
    std::vector<size_t> w(results.size());
    for (size_t j = 0; j < results.size(); ++j) {
      w[j] = results[j].label.size();
      for (auto& [n, c] : rows) w[j] = std::max(w[j], c[j].size());
    }
    std::string out = std::string(w0, ' ');
    for (size_t j = 0; j < results.size(); ++j)
      out += "  " + results[j].label + std::string(w[j] - results[j].label.size(), ' ');
    out += "\n";
    for (auto& [n, c] : rows) {
      out += n + std::string(w0 - n.size(), ' ');
      for (size_t j = 0; j < c.size(); ++j) out += "  " + c[j] + std::string(w[j] - c[j].size(), ' ');
      out += "\n";
    }
    std::fputs(out.c_str(), stdout);
    std::fflush(stdout);

    if (!o.json.empty()) {
      std::ofstream f(o.json);
      if (!f) throw Error("msa eval: cannot write " + o.json);
      auto acc_json = [](const Acc& a) {
        return "{\"accuracy\": " + jnum(a.rate()) + ", \"right\": " + std::to_string(a.right) +
               ", \"total\": " + std::to_string(a.total) + "}";
      };
      f << "{\"checkpoints\": [";
      for (size_t j = 0; j < results.size(); ++j) {
        const Result& r = results[j];
        f << (j ? ", " : "") << "{\"path\": " << jstr(r.path) << ", \"label\": " << jstr(r.label)
          << ", \"route\": " << jstr(r.route) << ", \"mode\": " << jstr(r.mode) << ", \"seq_len\": " << r.seq_len
          << ", \"val_loss\": " << jnum(r.vl.all) << ", \"val_loss_tail\": " << jnum(r.vl.tail)
          << ", \"tail_tokens_per_seq\": " << (o.valid_samples ? r.vl.tail_tokens / o.valid_samples : 0)
          << ", \"retrieval\": {\"overall\": " << acc_json(r.overall) << ", \"answer_tokens\": " << acc_json(r.tokens)
          << ", \"by_task\": {";
        size_t i = 0;
        for (auto& [k, a] : r.by_task) f << (i++ ? ", " : "") << jstr(k) << ": " << acc_json(a);
        f << "}, \"by_context\": {";
        i = 0;
        for (auto& [k, a] : r.by_ctx) f << (i++ ? ", " : "") << "\"" << k << "\": " << acc_json(a);
        f << "}, \"by_depth\": {";
        i = 0;
        for (auto& [k, a] : r.by_depth) f << (i++ ? ", " : "") << "\"" << jnum(k) << "\": " << acc_json(a);
        f << "}}, \"recall\": [";
        for (size_t l = 0; l < r.recall.size(); ++l)
          f << (l ? ", " : "") << "{\"layer\": " << l << ", \"block\": " << jnum(r.recall[l].first)
            << ", \"score\": " << jnum(r.recall[l].second) << ", \"static_block\": " << jnum(r.static_recall[l].first)
            << ", \"static_score\": " << jnum(r.static_recall[l].second)
            << ", \"kl_support_device\": " << jnum(l < r.kl.size() ? r.kl[l].sparse_dev : NAN)
            << ", \"kl_support_cpu\": " << jnum(l < r.kl.size() ? r.kl[l].sparse_cpu : NAN)
            << ", \"kl_full_prefix_cpu\": " << jnum(l < r.kl.size() ? r.kl[l].full_cpu : NAN) << "}";
        f << "]}";
      }
      f << "]}\n";
    }
    return 0;
  });
}

int run_viz(const VizOptions& o) {
  return report_errors("viz", [&] {
    if (o.what == "curves") {
      std::vector<std::string> keys = o.keys;
      if (keys.empty()) keys = {"lm_loss", "val_loss", "kl", "lr"};
      const std::vector<std::string> files = o.inputs.empty() ? std::vector<std::string>{o.input} : o.inputs;
      std::vector<viz::Series> series;
      for (const std::string& file : files) {
        // Several runs in one picture: a series is named by its run's folder, and the panel stays the key's.
        const std::filesystem::path dir = std::filesystem::path(file).parent_path();
        const std::string run = dir.filename().string().empty() ? file : dir.filename().string();
        for (auto& s : viz::read_metrics_jsonl(file, keys)) {
          if (s.x.empty()) continue;
          s.panel = s.name == "lm_loss" || s.name == "val_loss" || s.name == "loss" ? "loss" : s.name;
          if (files.size() > 1) s.name = run + " " + s.name;
          series.push_back(std::move(s));
        }
      }
      if (series.empty()) throw Error("msa viz curves: " + files[0] + " holds none of the asked keys");
      viz::curves(series).write_png(o.out);
      std::fprintf(stderr, "msa viz: wrote %s\n", o.out.c_str());
      return 0;
    }
    set_threads(o.threads);
    Checkpoint ck = load_checkpoint(o.input, false);
    if (ck.route == Route::dense)
      throw Error("msa viz heatmap: " + o.input + " is a dense checkpoint; its index branch was never trained");
    const at::Device device = parse_device(o.device);
    LM model = model_from_checkpoint(ck, device);
    const ModelConfig& mc = model.config();
    const int64_t layer = o.layer >= 0 ? o.layer : mc.dense_layers;
    if (layer < mc.dense_layers || layer >= mc.n_layers)
      throw Error("msa viz heatmap: --layer " + std::to_string(layer) + " is not an MSA layer (layers " +
                  std::to_string(mc.dense_layers) + ".." + std::to_string(mc.n_layers - 1) + ")");
    if (o.group >= mc.h_kv)
      throw Error("msa viz heatmap: --group " + std::to_string(o.group) +
                  ", expected < h_kv = " + std::to_string(mc.h_kv));
    const data::Corpus corpus = data::Corpus::load(o.corpus.empty() ? ck.corpus : o.corpus);
    const int64_t seq_len = o.seq_len > 0 ? o.seq_len : ck.cfg.seq_len;
    std::vector<int64_t> in;
    if (o.task == "text") {
      data::Sample s = validation_stream(corpus, seq_len).sample(o.sample);
      in.assign(s.tokens.begin(), s.tokens.end() - 1);
    } else {
      data::RetrievalCase rc = data::make_retrieval(corpus, data::parse_task(o.task), seq_len, 0.5,
                                                    uint64_t(o.sample) + 1, data::Split::valid);
      in.assign(rc.prompt.begin(), rc.prompt.end());
    }
    const int64_t n = int64_t(in.size());
    Trace trace;
    infer(model, at::tensor(in, at::kLong).to(device),
          at::tensor(std::vector<int32_t>{0, int32_t(n)}, at::kInt).to(device), AttnMode::sparse, &trace);
    at::Tensor sel = trace[layer].topk_idx.to(at::kCPU).contiguous();
    viz::selection_heatmap(sel.data_ptr<int32_t>(), n, mc.h_kv, mc.topk, mc.bk, o.group).write_png(o.out);
    std::fprintf(stderr, "msa viz: wrote %s (layer %lld, group %lld, %lld tokens)\n", o.out.c_str(), (long long)layer,
                 (long long)o.group, (long long)n);
    return 0;
  });
}

}  // namespace msa::train
