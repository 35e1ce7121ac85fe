// trainer/data.cpp — byte tokens, corpus loading, the built-in text generator, the training mix and
// retrieval cases declared in data.h.
#include "data.h"

#include <msa/common.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>

namespace msa::data {
namespace {

#include "corpus_builtin.inc"

[[noreturn]] void fail(const std::string& fn, const std::string& msg) {
  throw msa::Error("msa::data::" + fn + ": " + msg);
}

// splitmix64: every random choice derives from (seed, index, salt) through it, so a sample never
// depends on the samples before it.
uint64_t mix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

struct Rng {
  uint64_t s;
  explicit Rng(uint64_t seed) : s(mix64(seed)) {}
  Rng(uint64_t a, uint64_t b, uint64_t c) : s(mix64(mix64(mix64(a) ^ b) ^ c)) {}
  uint64_t next() { return mix64(s++); }
  // Uniform in [0, n); n > 0. The modulo bias is < n / 2^64, irrelevant at these sizes.
  uint64_t below(uint64_t n) { return next() % n; }
  int64_t range(int64_t lo, int64_t hi) { return lo + static_cast<int64_t>(below(hi - lo + 1)); }
  double unit() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }
  bool chance(double p) { return unit() < p; }
  template <class T, size_t N>
  const T& pick(const T (&a)[N]) {
    return a[below(N)];
  }
};

constexpr uint64_t kSaltKind = 1, kSaltText = 2, kSaltDoc = 3;

// ---- Built-in corpus ----------------------------------------------------------------------------
// A grammar over word lists, with per-document invented names and identifiers that recur inside
// the document: predicting them needs the earlier context, which is what long-context attention is
// for. Essays, code-like listings and tables, a few hundred KB in all.
class Writer {
 public:
  explicit Writer(uint64_t seed) : r_(seed) {}
  std::string out;

  void document(int64_t doc) {
    names_.clear();
    idents_.clear();
    const int n_names = 3 + static_cast<int>(r_.below(4));
    for (int i = 0; i < n_names; ++i) names_.push_back(name());
    for (int i = 0; i < 6; ++i) idents_.push_back(ident());
    topic_.clear();
    for (int i = 0; i < 4; ++i) topic_.push_back(r_.pick(kNouns));
    const uint64_t kind = r_.below(20);
    if (kind < 12) {
      essay(doc);
    } else if (kind < 17) {
      code(doc);
    } else {
      table(doc);
    }
    out += "\n";
  }

 private:
  Rng r_;
  std::vector<std::string> names_, idents_;
  std::vector<std::string> topic_;

  std::string name() {
    std::string s;
    const int n = 2 + static_cast<int>(r_.below(2));
    for (int i = 0; i < n; ++i) s += r_.pick(kSyllables);
    s[0] = static_cast<char>(s[0] - 'a' + 'A');
    return s;
  }
  std::string ident() {
    std::string s = r_.pick(kVerbs)[0];
    s += "_";
    s += r_.pick(kNouns);
    return s;
  }
  // Nouns lean toward the document's topic so that a document reads as being about something.
  std::string noun() { return r_.chance(0.35) ? topic_[r_.below(topic_.size())] : r_.pick(kNouns); }
  std::string subject() {
    const uint64_t k = r_.below(10);
    if (k < 3) return names_[r_.below(names_.size())];
    if (k < 4) return "the " + names_[r_.below(names_.size())] + " " + noun();
    std::string s = r_.chance(0.5) ? "the " : (r_.chance(0.5) ? "a " : "every ");
    if (s == "a " && std::string("aeiou").find(r_.pick(kAdjectives)[0]) != std::string::npos) {
      s = "the ";
    }
    if (r_.chance(0.55)) s += std::string(r_.pick(kAdjectives)) + " ";
    return s + noun();
  }
  std::string object() {
    std::string s = r_.chance(0.7) ? "the " : "some ";
    if (r_.chance(0.5)) s += std::string(r_.pick(kAdjectives)) + " ";
    s += noun();
    if (r_.chance(0.3)) s += std::string(" ") + r_.pick(kPrepositions) + " the " + noun();
    return s;
  }
  std::string clause(bool past) {
    const int t = past ? 2 : 1;
    std::string s = subject() + " ";
    if (r_.chance(0.2)) s += std::string(r_.pick(kAdverbs)) + " ";
    if (r_.chance(0.7)) {
      s += std::string(r_.pick(kVerbs)[t]) + " " + object();
    } else {
      s += r_.pick(kVerbsIntr)[t];
      if (r_.chance(0.6)) s += std::string(" ") + r_.pick(kPrepositions) + " the " + noun();
    }
    return s;
  }
  static std::string cap(std::string s) {
    if (!s.empty() && s[0] >= 'a' && s[0] <= 'z') s[0] = static_cast<char>(s[0] - 'a' + 'A');
    return s;
  }
  std::string sentence(bool past) {
    const uint64_t k = r_.below(12);
    std::string s;
    if (k < 4) {
      s = clause(past);
    } else if (k < 6) {
      s = clause(past) + " " + r_.pick(kConnectives) + " " + clause(past);
    } else if (k < 7) {
      s = std::string(r_.pick(kOpeners)) + ", " + clause(past);
    } else if (k < 8) {
      s = names_[r_.below(names_.size())] + (past ? " said that " : " says that ") + clause(past);
    } else if (k < 9) {
      s = clause(past) + ", but " + clause(past);
    } else if (k < 10) {
      s = "In " + std::to_string(r_.range(1500, 2030)) + ", " + clause(true) + " " + std::to_string(r_.range(2, 990)) +
          " times";
    } else if (k < 11) {
      const char* v = r_.pick(kVerbs)[0];
      s = (past ? "Why did " : "Why does ") + subject() + " " + v + " " + object() + "?";
      return cap(s);
    } else {
      s = clause(past) + ", and " + clause(past);
    }
    return cap(s) + ".";
  }
  void essay(int64_t doc) {
    const bool past = r_.chance(0.6);
    out += "Chapter " + std::to_string(doc + 1) + ": The " + cap(r_.pick(kAdjectives)) + " " + cap(topic_[0]) + "\n\n";
    const int paragraphs = 4 + static_cast<int>(r_.below(8));
    for (int p = 0; p < paragraphs; ++p) {
      const int sentences = 3 + static_cast<int>(r_.below(6));
      std::string para;
      for (int i = 0; i < sentences; ++i) {
        if (i) para += " ";
        para += sentence(past);
      }
      wrap(para, 78);
      out += "\n";
    }
  }
  void wrap(const std::string& text, size_t width) {
    size_t line = 0;
    std::istringstream words(text);
    std::string w;
    while (words >> w) {
      if (line && line + 1 + w.size() > width) {
        out += "\n";
        line = 0;
      } else if (line) {
        out += " ";
        ++line;
      }
      out += w;
      line += w.size();
    }
    out += "\n";
  }
  std::string expr(const std::vector<std::string>& vars) {
    const char* ops[] = {"+", "-", "*", "//", "%"};
    std::string s = vars[r_.below(vars.size())];
    const int terms = 1 + static_cast<int>(r_.below(3));
    for (int i = 0; i < terms; ++i) {
      s += std::string(" ") + r_.pick(ops) + " ";
      s += r_.chance(0.5) ? vars[r_.below(vars.size())] : std::to_string(r_.range(1, 97));
    }
    return s;
  }
  void code(int64_t doc) {
    out += "# module " + idents_[0] + " (listing " + std::to_string(doc + 1) + ")\n\n";
    const int functions = 3 + static_cast<int>(r_.below(5));
    for (int f = 0; f < functions; ++f) {
      const std::string fn = idents_[r_.below(idents_.size())] + (f ? "_" + std::to_string(f) : "");
      std::vector<std::string> vars;
      const int n_args = 1 + static_cast<int>(r_.below(3));
      for (int a = 0; a < n_args; ++a) vars.push_back(r_.pick(kNouns));
      out += "def " + fn + "(";
      for (int a = 0; a < n_args; ++a) out += (a ? ", " : "") + vars[a];
      out += "):\n    \"\"\"" + sentence(false) + "\"\"\"\n";
      const std::string acc = std::string(r_.pick(kAdjectives)) + "_" + r_.pick(kNouns);
      out += "    " + acc + " = " + expr(vars) + "\n";
      vars.push_back(acc);
      const int stmts = 2 + static_cast<int>(r_.below(5));
      for (int s = 0; s < stmts; ++s) {
        const uint64_t k = r_.below(4);
        if (k == 0) {
          out += "    for i in range(" + std::to_string(r_.range(2, 64)) + "):\n";
          out += "        " + acc + " += " + expr(vars) + "\n";
        } else if (k == 1) {
          out += "    if " + acc + " > " + std::to_string(r_.range(0, 500)) + ":\n";
          out += "        " + acc + " = " + idents_[r_.below(idents_.size())] + "(" + acc + ")\n";
        } else if (k == 2) {
          out += "    # " + clause(false) + "\n";
        } else {
          out += "    " + acc + " = " + expr(vars) + "\n";
        }
      }
      out += "    return " + acc + "\n\n";
    }
  }
  void table(int64_t doc) {
    out += "Table " + std::to_string(doc + 1) + ". Inventory of the " + names_[0] + " " + topic_[0] + "\n\n";
    const int rows = 8 + static_cast<int>(r_.below(24));
    for (int i = 0; i < rows; ++i) {
      out += std::to_string(i + 1) + ". " + cap(r_.pick(kAdjectives)) + " " + noun() + ": " +
             std::to_string(r_.range(1, 999)) + "." + std::to_string(r_.range(0, 9)) + " " + r_.pick(kUnits) +
             ", kept by " + names_[r_.below(names_.size())] + "\n";
    }
    out += "\n" + cap(sentence(true)) + "\n";
  }
};

const Corpus& builtin_corpus() {
  static const Corpus c = [] {
    Writer w(20261126);
    int64_t doc = 0;
    while (w.out.size() < 320 * 1024) w.document(doc++);
    Corpus corpus;
    corpus.text = std::move(w.out);
    corpus.source = "built-in";
    return corpus;
  }();
  return c;
}

constexpr int64_t kMinSplit = 1024;

// The valid split is the last 5%, starting at a line start so that it begins with whole words.
int64_t tail_split(const std::string& text, int64_t min_valid = 0) {
  const int64_t n = static_cast<int64_t>(text.size());
  int64_t v = n - std::max(n / 20, min_valid);
  // Back to the line start at or before v, so the valid split holds at least what was asked.
  const size_t nl = v > 0 ? text.rfind('\n', static_cast<size_t>(v - 1)) : std::string::npos;
  if (nl != std::string::npos && nl > 0) v = static_cast<int64_t>(nl) + 1;
  return v;
}

bool is_text_extension(const std::filesystem::path& p) {
  static const char* const exts[] = {".txt", ".rst",  ".md",   ".py",   ".c",   ".h",  ".cc",  ".cpp",
                                     ".hpp", ".rs",   ".go",   ".java", ".js",  ".sh", ".tex", ".html",
                                     ".xml", ".json", ".yaml", ".toml", ".cfg", ".ini"};
  const std::string e = p.extension().string();
  for (const char* x : exts) {
    if (e == x) return true;
  }
  return false;
}

std::string read_all(const std::filesystem::path& p) {
  std::ifstream f(p, std::ios::binary);
  if (!f) fail("Corpus::load", "cannot open '" + p.string() + "'");
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// n bytes of s read cyclically from `start`, `sep` joining the end to the beginning.
void read_cyclic(std::string_view s, int64_t start, int64_t n, std::string& out) {
  const int64_t len = static_cast<int64_t>(s.size());
  int64_t pos = start % len;
  while (n > 0) {
    if (pos == len) {
      out += '\n';
      --n;
      pos = 0;
      continue;
    }
    const int64_t take = std::min(n, len - pos);
    out.append(s.data() + pos, static_cast<size_t>(take));
    pos += take;
    n -= take;
  }
}

// A random line start of s (the first byte if none follows the random offset closely).
int64_t line_start(std::string_view s, Rng& r) {
  const int64_t len = static_cast<int64_t>(s.size());
  const int64_t off = static_cast<int64_t>(r.below(static_cast<uint64_t>(len)));
  const size_t nl = s.find('\n', static_cast<size_t>(off));
  if (nl == std::string_view::npos || static_cast<int64_t>(nl) - off > 512) return off;
  return (static_cast<int64_t>(nl) + 1) % len;
}

// ---- Retrieval documents ------------------------------------------------------------------------
struct Fact {
  std::string text;  // the needle as inserted in the haystack
  bool asked;        // the question asks about it
  int order;         // multivalue: rank by position (filled after placement); others: unused
};

struct Doc {
  std::vector<int32_t> tokens;      // kBos, body, question, answer (answer absent for eval)
  std::vector<uint8_t> is_answer;   // per token: part of an answer
  int64_t prompt_len = 0;           // tokens before the final answer
  std::vector<int32_t> answer;      // the final answer
  std::vector<int64_t> needle_pos;  // asked needles' token offsets, primary first
};

const char* const kKeyAdj[] = {"quiet",  "bright", "narrow",  "ancient", "hollow",  "silver",
                               "heavy",  "gentle", "distant", "golden",  "frozen",  "rusty",
                               "wooden", "steady", "crooked", "pale",    "curious", "stubborn"};

size_t max_len(const char* const* a, size_t n) {
  size_t m = 0;
  for (size_t i = 0; i < n; ++i) m = std::max(m, std::string(a[i]).size());
  return m;
}

// Longest NIAH key ("adjective-noun") the generator makes.
int64_t max_key_len() {
  static const int64_t m =
      static_cast<int64_t>(max_len(kKeyAdj, std::size(kKeyAdj)) + 1 + max_len(kNouns, std::size(kNouns)));
  return m;
}

const std::string kNeedleHead = "The special magic number for ";
const std::string kNeedleMid = " is ";
const std::string kNeedleTail = ". ";

// Upper bound on everything a document of this task holds besides the haystack (needles,
// question, answer), so that lengths are checked before any random choice.
int64_t fixed_len_bound(Task t, const RetrievalConfig& c) {
  const int64_t key = max_key_len();
  const int64_t needle =
      static_cast<int64_t>(kNeedleHead.size() + kNeedleMid.size() + kNeedleTail.size()) + key + c.value_digits;
  const int64_t question = 96;  // fixed words of the longest question
  switch (t) {
    case Task::text:
      return 0;
    case Task::niah_single:
      return needle + question + key + c.value_digits;
    case Task::niah_multikey:
      return (1 + c.n_distractors) * needle + question + key + c.value_digits;
    case Task::niah_multivalue:
      return c.n_values * (needle + c.value_digits + 2) + question + key;
    case Task::niah_multiquery:
      return c.n_queries * (needle + key + 5 + c.value_digits + 2) + question;
    case Task::mqar: {
      const int64_t pair = 4 + 1 + c.pair_digits + 3;  // "(abcd:123) "
      return c.n_pairs * pair + c.n_recall * pair + 16;
    }
  }
  return 0;
}

std::string digits(Rng& r, int n) {
  std::string s(1, static_cast<char>('1' + r.below(9)));
  for (int i = 1; i < n; ++i) s += static_cast<char>('0' + r.below(10));
  return s;
}

// Draws `n` distinct strings from `gen`.
template <class Gen>
std::vector<std::string> distinct(int n, Gen gen) {
  std::vector<std::string> v;
  while (static_cast<int>(v.size()) < n) {
    std::string s = gen();
    if (std::find(v.begin(), v.end(), s) == v.end()) v.push_back(std::move(s));
  }
  return v;
}

std::string join_list(const std::vector<std::string>& v, const char* last_sep) {
  std::string s;
  for (size_t i = 0; i < v.size(); ++i) {
    if (i) s += (i + 1 == v.size()) ? last_sep : ", ";
    s += v[i];
  }
  return s;
}

bool is_boundary(char c) { return c == ' ' || c == '\n'; }

// Moves a haystack offset back (at most 32 bytes, not below `lo`) to just after a space or
// newline, or to `lo` itself (the haystack start, or the end of the needle placed there), so that
// needles do not split words.
int64_t snap(const std::string& hay, int64_t h, int64_t lo) {
  for (int64_t d = 0; d <= 32 && h - d >= lo; ++d) {
    if (h - d == lo || is_boundary(hay[static_cast<size_t>(h - d - 1)])) return h - d;
  }
  return h;
}

// Builds kBos + body + question (+ answer when `with_answer`), the body holding `facts` in a
// haystack from `split`, facts[0] (the primary needle) starting `depth` of the way through the
// body. prompt_len = 1 + body + question is given exactly; the body absorbs the slack.
// `question_answers` marks the question's recall values (mqar) as answers.
Doc assemble(std::string_view split, int64_t prompt_len, double depth, std::vector<Fact>& facts,
             const std::string& question, const std::vector<std::pair<size_t, size_t>>& q_answers,
             const std::string& answer, Rng& r, const char* fn) {
  const int64_t q = static_cast<int64_t>(question.size());
  const int64_t body = prompt_len - 1 - q;
  int64_t needles = 0;
  for (const Fact& f : facts) needles += static_cast<int64_t>(f.text.size());
  const int64_t hay_len = body - needles;
  if (hay_len < 16) {
    fail(fn, "context of " + std::to_string(prompt_len) + " tokens is too short for the needles and question (" +
                 std::to_string(1 + q + needles) + " tokens)");
  }
  std::string hay;
  hay.reserve(static_cast<size_t>(hay_len));
  read_cyclic(split, line_start(split, r), hay_len, hay);

  // The primary needle's body offset is exact (before snapping); the others go left or right of
  // it, each side keeping enough haystack for the needles placed on it.
  const int64_t l0 = static_cast<int64_t>(facts[0].text.size());
  const int64_t p = std::llround(depth * static_cast<double>(body - l0));
  std::vector<int> left, right;
  int64_t left_len = 0, right_len = 0;
  const int64_t right_space = body - p - l0;
  for (size_t i = 1; i < facts.size(); ++i) {
    const int64_t li = static_cast<int64_t>(facts[i].text.size());
    const bool fits_left = p - left_len - li >= 0;
    const bool fits_right = right_space - right_len - li >= 0;
    const double w_left = static_cast<double>(std::max<int64_t>(p - left_len, 0));
    const double w_right = static_cast<double>(std::max<int64_t>(right_space - right_len, 0));
    bool go_left = fits_left && (!fits_right || r.unit() * (w_left + w_right) < w_left);
    if (!fits_left && !fits_right) fail(fn, "needles do not fit the context");
    if (go_left) {
      left.push_back(static_cast<int>(i));
      left_len += li;
    } else {
      right.push_back(static_cast<int>(i));
      right_len += li;
    }
  }
  // Haystack offsets: primary at h0 (snapped back to a word start), left needles in [0, h0],
  // right needles in [h0, hay_len].
  const int64_t h0 = snap(hay, p - left_len, 0);
  std::vector<std::pair<int64_t, int>> at;  // (haystack offset, fact); stable order breaks ties
  for (int i : left) at.push_back({snap(hay, r.range(0, h0), 0), i});
  at.push_back({h0, 0});
  for (int i : right) at.push_back({snap(hay, r.range(h0, hay_len), h0), i});
  // Left needles at h0 come before the primary and right ones after it, so that the primary
  // lands at exactly h0 + left_len.
  std::stable_sort(at.begin(), at.end(), [&](const auto& a, const auto& b) {
    auto key = [&](const auto& e) {
      const bool is_right = std::find(right.begin(), right.end(), e.second) != right.end();
      const int rank = e.second == 0 ? 1 : (is_right ? 2 : 0);
      return std::pair<int64_t, int>(e.first, rank);
    };
    return key(a) < key(b);
  });

  Doc d;
  d.tokens.reserve(static_cast<size_t>(prompt_len) + answer.size() + 1);
  d.tokens.push_back(kBos);
  std::vector<int64_t> pos(facts.size());
  int64_t h = 0;
  int order = 0;
  for (const auto& [off, i] : at) {
    for (; h < off; ++h) d.tokens.push_back(static_cast<uint8_t>(hay[static_cast<size_t>(h)]));
    pos[static_cast<size_t>(i)] = static_cast<int64_t>(d.tokens.size());
    facts[static_cast<size_t>(i)].order = order++;
    for (char c : facts[static_cast<size_t>(i)].text) d.tokens.push_back(static_cast<uint8_t>(c));
  }
  for (; h < hay_len; ++h) d.tokens.push_back(static_cast<uint8_t>(hay[static_cast<size_t>(h)]));
  d.is_answer.assign(d.tokens.size(), 0);
  const int64_t q_begin = static_cast<int64_t>(d.tokens.size());
  for (char c : question) d.tokens.push_back(static_cast<uint8_t>(c));
  d.is_answer.resize(d.tokens.size(), 0);
  for (const auto& [b, n] : q_answers) {
    for (size_t k = 0; k < n; ++k) d.is_answer[static_cast<size_t>(q_begin) + b + k] = 1;
  }
  d.prompt_len = static_cast<int64_t>(d.tokens.size());
  d.answer = encode(answer);
  for (size_t i = 0; i < facts.size(); ++i) {
    if (facts[i].asked) d.needle_pos.push_back(pos[i]);
  }
  return d;
}

// One retrieval document. eval: the answer stays out of d.tokens and the mqar recall list shows
// every value but the last; training: every recalled value is an answer inside the sequence.
Doc make_doc(std::string_view split, Task task, int64_t prompt_len, double depth, const RetrievalConfig& c, Rng& r,
             const char* fn) {
  std::vector<Fact> facts;
  std::string question, answer;
  std::vector<std::pair<size_t, size_t>> q_answers;
  auto key_gen = [&] { return std::string(r.pick(kKeyAdj)) + "-" + r.pick(kNouns); };
  auto needle = [](const std::string& k, const std::string& v) {
    return kNeedleHead + k + kNeedleMid + v + kNeedleTail;
  };
  switch (task) {
    case Task::text:
      fail(fn, "task text has no retrieval document");
    case Task::niah_single:
    case Task::niah_multikey: {
      const int n = task == Task::niah_single ? 1 : 1 + c.n_distractors;
      const auto keys = distinct(n, key_gen);
      const auto values = distinct(n, [&] { return digits(r, c.value_digits); });
      for (int i = 0; i < n; ++i) facts.push_back({needle(keys[i], values[i]), i == 0, 0});
      question = "\nQuestion: What is the special magic number for " + keys[0] + "?\nAnswer: ";
      answer = values[0];
      break;
    }
    case Task::niah_multivalue: {
      const std::string key = key_gen();
      const auto values = distinct(c.n_values, [&] { return digits(r, c.value_digits); });
      for (int i = 0; i < c.n_values; ++i) facts.push_back({needle(key, values[i]), true, 0});
      question = "\nQuestion: What are all the special magic numbers for " + key + "?\nAnswer: ";
      answer = "";  // in order of appearance: known after placement
      break;
    }
    case Task::niah_multiquery: {
      const auto keys = distinct(c.n_queries, key_gen);
      const auto values = distinct(c.n_queries, [&] { return digits(r, c.value_digits); });
      for (int i = 0; i < c.n_queries; ++i) facts.push_back({needle(keys[i], values[i]), true, 0});
      question = "\nQuestion: What are the special magic numbers for " + join_list(keys, " and ") + "?\nAnswer: ";
      answer = join_list(values, ", ");
      break;
    }
    case Task::mqar: {
      const auto keys = distinct(c.n_pairs, [&] {
        std::string k;
        for (int i = 0; i < 4; ++i) k += static_cast<char>('a' + r.below(26));
        return k;
      });
      std::vector<std::string> values;
      for (int i = 0; i < c.n_pairs; ++i) values.push_back(digits(r, c.pair_digits));
      // Recall order: a random subset, the primary (pair 0, placed at the depth) asked last.
      std::vector<int> order(static_cast<size_t>(c.n_pairs - 1));
      for (int i = 0; i < c.n_pairs - 1; ++i) order[static_cast<size_t>(i)] = i + 1;
      for (size_t i = order.size(); i > 1; --i) std::swap(order[i - 1], order[r.below(i)]);
      order.resize(static_cast<size_t>(c.n_recall - 1));
      order.push_back(0);
      for (int i = 0; i < c.n_pairs; ++i) {
        facts.push_back({"(" + keys[i] + ":" + values[i] + ") ", i == 0, 0});
      }
      question = "\nRecall:";
      for (size_t i = 0; i < order.size(); ++i) {
        const int p = order[i];
        question += " " + keys[p] + ":";
        if (i + 1 < order.size()) {
          q_answers.push_back({question.size(), values[p].size()});
          question += values[p];
        }
      }
      answer = values[0];
      break;
    }
  }
  Doc d = assemble(split, prompt_len, depth, facts, question, q_answers, answer, r, fn);
  if (task == Task::niah_multivalue) {
    std::vector<std::pair<int, std::string>> seen;
    for (const Fact& f : facts) {
      const size_t b = kNeedleHead.size();
      const size_t m = f.text.find(kNeedleMid, b);
      seen.push_back(
          {f.order, f.text.substr(m + kNeedleMid.size(), f.text.size() - m - kNeedleMid.size() - kNeedleTail.size())});
    }
    std::sort(seen.begin(), seen.end());
    std::vector<std::string> vals;
    for (auto& s : seen) vals.push_back(s.second);
    d.answer = encode(join_list(vals, ", "));
  }
  return d;
}

void check_config(const RetrievalConfig& c, const char* fn) {
  auto need = [&](bool ok, const std::string& what) {
    if (!ok) fail(fn, "RetrievalConfig." + what);
  };
  need(c.n_distractors >= 0 && c.n_distractors <= 64,
       "n_distractors = " + std::to_string(c.n_distractors) + ", expected 0..64");
  need(c.n_values >= 1 && c.n_values <= 64, "n_values = " + std::to_string(c.n_values) + ", expected 1..64");
  need(c.n_queries >= 1 && c.n_queries <= 64, "n_queries = " + std::to_string(c.n_queries) + ", expected 1..64");
  need(c.value_digits >= 2 && c.value_digits <= 12,
       "value_digits = " + std::to_string(c.value_digits) + ", expected 2..12");
  need(c.n_pairs >= 1 && c.n_pairs <= 4096, "n_pairs = " + std::to_string(c.n_pairs) + ", expected 1..4096");
  need(c.n_recall >= 1 && c.n_recall <= c.n_pairs,
       "n_recall = " + std::to_string(c.n_recall) + ", expected 1..n_pairs (" + std::to_string(c.n_pairs) + ")");
  need(c.pair_digits >= 1 && c.pair_digits <= 12,
       "pair_digits = " + std::to_string(c.pair_digits) + ", expected 1..12");
}

constexpr std::array<Task, 5> kRetrievalTasks = {Task::niah_single, Task::niah_multikey, Task::niah_multivalue,
                                                 Task::niah_multiquery, Task::mqar};

}  // namespace

// ---- Tokens -------------------------------------------------------------------------------------
std::vector<int32_t> encode(std::string_view text) {
  std::vector<int32_t> t(text.size());
  for (size_t i = 0; i < text.size(); ++i) t[i] = static_cast<uint8_t>(text[i]);
  return t;
}

std::string decode(const int32_t* tokens, int64_t n) {
  std::string s;
  s.reserve(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    const int32_t t = tokens[i];
    if (t >= 0 && t < 256) {
      s += static_cast<char>(t);
    } else if (t == kBos) {
      s += "<bos>";
    } else if (t == kEos) {
      s += "<eos>";
    } else if (t == kPad) {
      s += "<pad>";
    } else {
      s += "<?" + std::to_string(t) + ">";
    }
  }
  return s;
}

std::string decode(const std::vector<int32_t>& tokens) {
  return decode(tokens.data(), static_cast<int64_t>(tokens.size()));
}

// ---- Corpus -------------------------------------------------------------------------------------
const char* split_name(Split s) { return s == Split::train ? "train" : "valid"; }

Corpus Corpus::builtin() {
  Corpus c = builtin_corpus();
  // 48 KiB rather than 5%: a validation sample of the GPU configs (32K tokens) then reads the
  // valid split without wrapping around, which would let the model copy its own context.
  c.valid_begin = tail_split(c.text, 48 * 1024);
  return c;
}

Corpus Corpus::load(const std::string& path_or_empty) {
  namespace fs = std::filesystem;
  if (path_or_empty.empty()) return builtin();
  const fs::path root(path_or_empty);
  std::error_code ec;
  if (!fs::exists(root, ec)) fail("Corpus::load", "path '" + path_or_empty + "' does not exist");
  Corpus c;
  c.source = path_or_empty;
  if (fs::is_directory(root)) {
    if (fs::is_regular_file(root / "train.txt") && fs::is_regular_file(root / "valid.txt")) {
      c.text = read_all(root / "train.txt");
      c.valid_begin = static_cast<int64_t>(c.text.size());
      c.text += read_all(root / "valid.txt");
    } else {
      std::vector<std::string> files;
      for (const auto& e : fs::recursive_directory_iterator(root)) {
        if (e.is_regular_file() && is_text_extension(e.path())) files.push_back(e.path().string());
      }
      std::sort(files.begin(), files.end());
      for (const std::string& f : files) {
        std::string t = read_all(f);
        if (t.empty()) continue;
        if (!c.text.empty()) c.text += "\n\n";
        c.text += t;
      }
      if (c.text.empty()) {
        fail("Corpus::load",
             "directory '" + path_or_empty + "' holds no text files (" + "extensions .txt .rst .md .py .c .h ...)");
      }
      c.valid_begin = tail_split(c.text);
    }
  } else {
    c.text = read_all(root);
    c.valid_begin = tail_split(c.text);
  }
  const int64_t n = static_cast<int64_t>(c.text.size());
  if (c.valid_begin < kMinSplit || n - c.valid_begin < kMinSplit) {
    fail("Corpus::load", "'" + path_or_empty + "' gives a train split of " + std::to_string(c.valid_begin) +
                             " bytes and a valid split of " + std::to_string(n - c.valid_begin) +
                             " bytes, expected >= " + std::to_string(kMinSplit) + " each");
  }
  return c;
}

std::string_view Corpus::split(Split s) const {
  const std::string_view all(text);
  return s == Split::train ? all.substr(0, static_cast<size_t>(valid_begin))
                           : all.substr(static_cast<size_t>(valid_begin));
}

// ---- Tasks --------------------------------------------------------------------------------------
const char* task_name(Task t) {
  switch (t) {
    case Task::text:
      return "text";
    case Task::niah_single:
      return "niah_single";
    case Task::niah_multikey:
      return "niah_multikey";
    case Task::niah_multivalue:
      return "niah_multivalue";
    case Task::niah_multiquery:
      return "niah_multiquery";
    case Task::mqar:
      return "mqar";
  }
  return "?";
}

Task parse_task(std::string_view name) {
  for (Task t :
       {Task::text, Task::niah_single, Task::niah_multikey, Task::niah_multivalue, Task::niah_multiquery, Task::mqar}) {
    if (name == task_name(t)) return t;
  }
  fail("parse_task", "unknown task '" + std::string(name) +
                         "', expected text, niah_single, niah_multikey, niah_multivalue, "
                         "niah_multiquery or mqar");
}

std::vector<Task> parse_tasks(std::string_view list) {
  if (list == "all") return {kRetrievalTasks.begin(), kRetrievalTasks.end()};
  std::vector<Task> out;
  size_t b = 0;
  while (b <= list.size()) {
    size_t e = list.find(',', b);
    if (e == std::string_view::npos) e = list.size();
    const std::string_view item = list.substr(b, e - b);
    if (item.empty()) fail("parse_tasks", "empty task name in '" + std::string(list) + "'");
    out.push_back(parse_task(item));
    b = e + 1;
  }
  return out;
}

// ---- Stream -------------------------------------------------------------------------------------
Stream::Stream(const Corpus& corpus, MixConfig config, uint64_t seed, Split split)
    : corpus_(&corpus), config_(std::move(config)), seed_(seed), split_(split) {
  const char* fn = "Stream";
  if (config_.seq_len < 64) {
    fail(fn, "seq_len = " + std::to_string(config_.seq_len) + ", expected >= 64");
  }
  if (!(config_.retrieval_fraction >= 0.0 && config_.retrieval_fraction <= 1.0)) {
    fail(fn, "retrieval_fraction = " + std::to_string(config_.retrieval_fraction) + ", expected 0..1");
  }
  if (config_.tasks.empty()) config_.tasks.assign(kRetrievalTasks.begin(), kRetrievalTasks.end());
  check_config(config_.retrieval, fn);
  if (corpus.split(split).empty()) fail(fn, std::string(split_name(split)) + " split is empty");
  for (Task t : config_.tasks) {
    if (t == Task::text) fail(fn, "tasks holds 'text'; list retrieval tasks only");
    const int64_t need = fixed_len_bound(t, config_.retrieval) + 64;
    if (config_.retrieval_fraction > 0 && config_.seq_len < need) {
      fail(fn, "seq_len = " + std::to_string(config_.seq_len) + " is too short for task " + task_name(t) +
                   ", expected >= " + std::to_string(need));
    }
  }
}

Sample Stream::sample(int64_t index) const {
  if (index < 0) fail("Stream::sample", "index = " + std::to_string(index) + ", expected >= 0");
  const int64_t total = config_.seq_len + 1;
  const std::string_view split = corpus_->split(split_);
  Sample s;
  s.tokens.reserve(static_cast<size_t>(total));
  Rng kind(seed_, static_cast<uint64_t>(index), kSaltKind);
  if (config_.retrieval_fraction > 0 && kind.chance(config_.retrieval_fraction)) {
    s.task = config_.tasks[kind.below(config_.tasks.size())];
    Rng r(seed_, static_cast<uint64_t>(index), kSaltDoc);
    const double depth = r.unit();
    // The answer's length is fixed by the config (values have fixed digits), so the prompt
    // length is chosen for the document to end with kEos at exactly seq_len + 1 tokens.
    const RetrievalConfig& c = config_.retrieval;
    int64_t answer_len = 0;
    switch (s.task) {
      case Task::niah_single:
      case Task::niah_multikey:
        answer_len = c.value_digits;
        break;
      case Task::niah_multivalue:
        answer_len = c.n_values * (c.value_digits + 2) - 2;
        break;
      case Task::niah_multiquery:
        answer_len = c.n_queries * (c.value_digits + 2) - 2;
        break;
      case Task::mqar:
        answer_len = c.pair_digits;
        break;
      case Task::text:
        break;
    }
    Doc d = make_doc(split, s.task, total - answer_len - 1, depth, c, r, "Stream::sample");
    s.tokens = std::move(d.tokens);
    s.tokens.insert(s.tokens.end(), d.answer.begin(), d.answer.end());
    s.tokens.push_back(kEos);
    d.is_answer.resize(s.tokens.size(), 0);
    for (size_t i = 0; i < d.answer.size(); ++i) {
      d.is_answer[static_cast<size_t>(d.prompt_len) + i] = 1;
    }
    s.answer_mask.assign(d.is_answer.begin() + 1, d.is_answer.end());
  } else {
    Rng r(seed_, static_cast<uint64_t>(index), kSaltText);
    s.tokens.push_back(kBos);
    // Read cyclically; the wrap point becomes kEos rather than a byte.
    const int64_t len = static_cast<int64_t>(split.size());
    int64_t pos = line_start(split, r);
    while (static_cast<int64_t>(s.tokens.size()) < total) {
      if (pos == len) {
        s.tokens.push_back(kEos);
        pos = 0;
        continue;
      }
      s.tokens.push_back(static_cast<uint8_t>(split[static_cast<size_t>(pos++)]));
    }
    s.answer_mask.assign(static_cast<size_t>(config_.seq_len), 0);
  }
  return s;
}

// ---- Evaluation cases ---------------------------------------------------------------------------
RetrievalCase make_retrieval(const Corpus& corpus, Task task, int64_t context_len, double depth, uint64_t seed, Split s,
                             const RetrievalConfig& config) {
  const char* fn = "make_retrieval";
  if (task == Task::text) fail(fn, "task = text, expected a retrieval task");
  if (!(depth >= 0.0 && depth <= 1.0)) {
    fail(fn, "depth = " + std::to_string(depth) + ", expected 0..1");
  }
  check_config(config, fn);
  const int64_t need = fixed_len_bound(task, config) + 17;
  if (context_len < need) {
    fail(fn, "context_len = " + std::to_string(context_len) + " is too short for task " + task_name(task) +
                 ", expected >= " + std::to_string(need));
  }
  const std::string_view split = corpus.split(s);
  if (split.empty()) fail(fn, std::string(split_name(s)) + " split is empty");
  // The depth takes part in the seed so that cases at different depths use different haystacks
  // and needles, as independent trials.
  Rng r(seed, static_cast<uint64_t>(context_len) * 1000003ull + static_cast<uint64_t>(task),
        static_cast<uint64_t>(std::llround(depth * 1e6)));
  Doc d = make_doc(split, task, context_len, depth, config, r, fn);
  RetrievalCase c;
  c.prompt = std::move(d.tokens);
  c.answer = std::move(d.answer);
  c.task = task;
  c.context_len = context_len;
  c.depth = depth;
  c.needle_pos = std::move(d.needle_pos);
  return c;
}

}  // namespace msa::data
