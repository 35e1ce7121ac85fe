// trainer/tests/test_data.cpp — tests of the trainer's data (data.h): tokens, corpus loading and
// splits, the deterministic training stream and the retrieval cases.
#include <gtest/gtest.h>
#include <msa/common.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <regex>
#include <set>

#include "data.h"

namespace fs = std::filesystem;
using namespace msa::data;

namespace {

const Corpus& builtin() {
  static const Corpus c = Corpus::load("");
  return c;
}

// A scratch directory removed at the end of the test.
struct TempDir {
  fs::path path;
  explicit TempDir(const std::string& name) {
    path = fs::temp_directory_path() / ("msa_test_data_" + name + "_" + std::to_string(std::random_device{}()));
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  void write(const std::string& rel, const std::string& text) const {
    fs::create_directories((path / rel).parent_path());
    std::ofstream(path / rel, std::ios::binary) << text;
  }
};

// Random words over the letters [lo, hi], lines of about 70 bytes.
std::string words(std::mt19937_64& rng, int64_t bytes, char lo, char hi) {
  std::string s;
  std::uniform_int_distribution<int> letter(lo, hi), len(1, 9);
  int64_t line = 0;
  while (static_cast<int64_t>(s.size()) < bytes) {
    const int n = len(rng);
    for (int i = 0; i < n; ++i) s += static_cast<char>(letter(rng));
    line += n + 1;
    if (line > 70) {
      s += '\n';
      line = 0;
    } else {
      s += ' ';
    }
  }
  return s;
}

template <class F>
void expect_error(F f, const std::string& needle1, const std::string& needle2) {
  try {
    f();
    ADD_FAILURE() << "no msa::Error thrown (expected one naming " << needle1 << ")";
  } catch (const msa::Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find(needle1), std::string::npos) << m;
    EXPECT_NE(m.find(needle2), std::string::npos) << m;
  }
}

std::string str(const std::vector<int32_t>& t) { return decode(t); }

// Parts of a NIAH/MQAR prompt, found from its text.
struct Parsed {
  std::string body;      // between kBos and the question
  std::string question;  // from "\nQuestion:" or "\nRecall:" to the end
};
Parsed parse(const RetrievalCase& c) {
  const std::string s = decode(c.prompt.data() + 1, static_cast<int64_t>(c.prompt.size()) - 1);
  const char* marker = c.task == Task::mqar ? "\nRecall:" : "\nQuestion:";
  const size_t q = s.rfind(marker);
  EXPECT_NE(q, std::string::npos) << task_name(c.task);
  return {s.substr(0, q), s.substr(q)};
}

// Every value stored under `key` in the body, in order of appearance.
std::vector<std::string> values_of(const std::string& body, const std::string& key, bool mqar) {
  const std::string head = mqar ? "(" + key + ":" : "The special magic number for " + key + " is ";
  const std::string tail = mqar ? ") " : ". ";
  std::vector<std::string> v;
  for (size_t p = body.find(head); p != std::string::npos; p = body.find(head, p + 1)) {
    const size_t b = p + head.size();
    v.push_back(body.substr(b, body.find(tail, b) - b));
  }
  return v;
}

std::vector<std::string> split_keys(std::string s) {
  // "a, b and c" or "a and b" or "a"
  std::vector<std::string> out;
  size_t p;
  while ((p = s.find(", ")) != std::string::npos || (p = s.find(" and ")) != std::string::npos) {
    out.push_back(s.substr(0, p));
    s = s.substr(p + (s.compare(p, 2, ", ") == 0 ? 2 : 5));
  }
  out.push_back(s);
  return out;
}

// The answer text rebuilt from the prompt alone.
std::string recover_answer(const RetrievalCase& c) {
  const Parsed p = parse(c);
  if (c.task == Task::mqar) {
    const size_t colon = p.question.rfind(':');
    const size_t space = p.question.rfind(' ', colon);
    const std::string key = p.question.substr(space + 1, colon - space - 1);
    const auto v = values_of(p.body, key, true);
    EXPECT_EQ(v.size(), 1u) << "mqar key " << key;
    return v.empty() ? "" : v[0];
  }
  const size_t f = p.question.find(" for ") + 5;
  const std::string keys = p.question.substr(f, p.question.find('?') - f);
  std::string answer;
  for (const std::string& k : split_keys(keys)) {
    const auto v = values_of(p.body, k, false);
    EXPECT_FALSE(v.empty()) << "no needle for key " << k;
    if (c.task != Task::niah_multivalue) {
      EXPECT_EQ(v.size(), 1u) << k;
    }
    for (const std::string& x : v) answer += (answer.empty() ? "" : ", ") + x;
  }
  return answer;
}

const std::vector<Task> kAll = parse_tasks("all");

}  // namespace

TEST(Tokens, BytesRoundTripAndSpecialsAreNamed) {
  std::string all;
  for (int b = 0; b < 256; ++b) all += static_cast<char>(b);
  const auto t = encode(all);
  ASSERT_EQ(t.size(), 256u);
  for (int b = 0; b < 256; ++b) EXPECT_EQ(t[static_cast<size_t>(b)], b);
  EXPECT_EQ(decode(t), all);
  EXPECT_EQ(decode({kBos, 'a', kEos, kPad, 999}), "<bos>a<eos><pad><?999>");
  EXPECT_EQ(kVocab, 256 + kNumSpecial);
  for (int32_t s : {kBos, kEos, kPad}) EXPECT_TRUE(s >= 256 && s < kVocab);
}

TEST(Tasks, NamesRoundTripAndBadNamesThrow) {
  for (Task t :
       {Task::text, Task::niah_single, Task::niah_multikey, Task::niah_multivalue, Task::niah_multiquery, Task::mqar}) {
    EXPECT_EQ(parse_task(task_name(t)), t);
  }
  EXPECT_EQ(kAll.size(), 5u);
  EXPECT_EQ(parse_tasks("mqar,niah_single"), (std::vector<Task>{Task::mqar, Task::niah_single}));
  expect_error([] { parse_task("niah"); }, "parse_task", "'niah'");
  expect_error([] { parse_tasks("mqar,,niah_single"); }, "parse_tasks", "empty");
}

TEST(Corpus, BuiltinIsDeterministicSizedAndNotTrivial) {
  const Corpus& c = builtin();
  EXPECT_EQ(c.source, "built-in");
  EXPECT_GE(c.text.size(), 200u * 1024);
  EXPECT_LE(c.text.size(), 1024u * 1024);
  EXPECT_EQ(Corpus::builtin().text, c.text);
  // Splits: adjacent, disjoint, valid starts at a line start, 48 KiB (a 32K-token sample fits).
  EXPECT_EQ(c.split(Split::train).size() + c.split(Split::valid).size(), c.text.size());
  EXPECT_EQ(c.text[static_cast<size_t>(c.valid_begin) - 1], '\n');
  EXPECT_GE(c.split(Split::valid).size(), 48u * 1024);
  EXPECT_LE(c.split(Split::valid).size(), 48u * 1024 + 512);

  // Not trivially compressible: many distinct words, order-2 conditional entropy of English-like
  // text (> 1.5 bits/byte; a repeated sentence would give ~0), and 64-byte windows that are
  // (almost all) unique.
  std::set<std::string> vocab;
  std::string w;
  for (char ch : c.text) {
    if (std::isalpha(static_cast<unsigned char>(ch))) {
      w += ch;
    } else if (!w.empty()) {
      vocab.insert(w);
      w.clear();
    }
  }
  EXPECT_GE(vocab.size(), 1000u);
  std::map<uint32_t, int64_t> ctx2, ctx3;
  for (size_t i = 2; i < c.text.size(); ++i) {
    const uint32_t a = static_cast<uint8_t>(c.text[i - 2]), b = static_cast<uint8_t>(c.text[i - 1]),
                   x = static_cast<uint8_t>(c.text[i]);
    ++ctx2[(a << 8) | b];
    ++ctx3[(a << 16) | (b << 8) | x];
  }
  double h = 0;
  const double n = static_cast<double>(c.text.size() - 2);
  for (const auto& [k, cnt] : ctx3) {
    const double p_joint = cnt / n, p_cond = static_cast<double>(cnt) / ctx2[k >> 8];
    h -= p_joint * std::log2(p_cond);
  }
  EXPECT_GT(h, 1.5) << "order-2 conditional entropy in bits/byte";
  std::mt19937_64 rng(5);
  int unique = 0;
  for (int i = 0; i < 200; ++i) {
    const size_t p = rng() % (c.text.size() - 64);
    const std::string_view win(c.text.data() + p, 64);
    unique += std::string_view(c.text).find(win) == std::string_view(c.text).rfind(win);
  }
  EXPECT_GE(unique, 190) << "of 200 random 64-byte windows occur once";
}

TEST(Corpus, DirectoryIsRecursiveSortedAndTextOnly) {
  TempDir d("dir");
  std::mt19937_64 rng(11);
  const std::string a = words(rng, 30000, 'a', 'z'), b = words(rng, 2000, 'a', 'z'), c = words(rng, 1500, 'a', 'z');
  d.write("b/z.py", c);
  d.write("a.txt", a);
  d.write("b/y.rst", b);
  d.write("b/image.bin", "\x01\x02 not text");
  d.write("empty.md", "");
  const Corpus k = Corpus::load(d.path.string());
  EXPECT_EQ(k.text, a + "\n\n" + b + "\n\n" + c);
  EXPECT_EQ(k.source, d.path.string());
  EXPECT_GT(k.valid_begin, 0);
  EXPECT_EQ(k.split(Split::valid), std::string_view(k.text).substr(static_cast<size_t>(k.valid_begin)));

  // A single file.
  const Corpus f = Corpus::load((d.path / "a.txt").string());
  EXPECT_EQ(f.text, a);
  EXPECT_EQ(f.text[static_cast<size_t>(f.valid_begin) - 1], '\n');
}

TEST(Corpus, PreparedDirectoryUsesTrainAndValidFiles) {
  TempDir d("prep");
  std::mt19937_64 rng(12);
  const std::string tr = words(rng, 5000, 'a', 'm'), va = words(rng, 2000, 'n', 'z');
  d.write("train.txt", tr);
  d.write("valid.txt", va);
  d.write("other.txt", "ignored when train.txt and valid.txt exist");
  const Corpus k = Corpus::load(d.path.string());
  EXPECT_EQ(k.split(Split::train), tr);
  EXPECT_EQ(k.split(Split::valid), va);
}

TEST(Corpus, BadPathsThrow) {
  TempDir d("bad");
  expect_error([&] { Corpus::load((d.path / "missing").string()); }, "Corpus::load", "does not exist");
  expect_error([&] { Corpus::load(d.path.string()); }, "Corpus::load", "no text files");
  d.write("tiny.txt", "just a few words\nand a line\n");
  expect_error([&] { Corpus::load((d.path / "tiny.txt").string()); }, "Corpus::load", "expected >= 1024");
}

TEST(Stream, SamplesArePureFunctionsOfSeedAndIndex) {
  MixConfig m;
  m.seq_len = 1023;
  m.retrieval_fraction = 0.5;
  const Stream s1(builtin(), m, 42), s2(builtin(), m, 42), s3(builtin(), m, 43);
  const std::vector<int64_t> idx = {0, 1, 2, 17, 1000, 123456789, int64_t{1} << 40};
  // Reverse order on the second stream: no state carries between calls.
  std::vector<Sample> fwd, rev(idx.size());
  for (int64_t i : idx) fwd.push_back(s1.sample(i));
  for (size_t k = idx.size(); k-- > 0;) rev[k] = s2.sample(idx[k]);
  int differ = 0;
  for (size_t k = 0; k < idx.size(); ++k) {
    EXPECT_EQ(fwd[k].tokens, rev[k].tokens) << "index " << idx[k];
    EXPECT_EQ(fwd[k].answer_mask, rev[k].answer_mask) << "index " << idx[k];
    EXPECT_EQ(fwd[k].task, rev[k].task);
    differ += s3.sample(idx[k]).tokens != fwd[k].tokens;
    if (k) {
      EXPECT_NE(fwd[k].tokens, fwd[k - 1].tokens);
    }
  }
  EXPECT_EQ(differ, static_cast<int>(idx.size())) << "another seed gives other samples";
  expect_error([&] { s1.sample(-1); }, "Stream::sample", "index = -1");
}

TEST(Stream, LengthsAreExactAndTokensValid) {
  for (int64_t seq_len : {64, 127, 129, 1023, 4097}) {
    MixConfig m;
    m.seq_len = seq_len;
    m.retrieval_fraction = seq_len >= 512 ? 0.6 : 0.0;
    for (Split sp : {Split::train, Split::valid}) {
      const Stream s(builtin(), m, 7, sp);
      for (int64_t i = 0; i < 40; ++i) {
        const Sample x = s.sample(i);
        ASSERT_EQ(static_cast<int64_t>(x.tokens.size()), seq_len + 1) << seq_len << " " << i;
        ASSERT_EQ(static_cast<int64_t>(x.answer_mask.size()), seq_len);
        EXPECT_EQ(x.tokens[0], kBos);
        for (size_t k = 1; k < x.tokens.size(); ++k) {
          const int32_t t = x.tokens[k];
          ASSERT_TRUE(t >= 0 && t < kVocab && t != kPad && t != kBos) << "token " << k << " = " << t;
        }
        if (x.task == Task::text) {
          for (uint8_t a : x.answer_mask) ASSERT_EQ(a, 0);
        } else {
          EXPECT_EQ(x.tokens.back(), kEos) << task_name(x.task);
        }
      }
    }
  }
}

TEST(Stream, MixFractionAndAnswerMask) {
  MixConfig m;
  m.seq_len = 1023;
  m.retrieval_fraction = 0.3;
  const Stream s(builtin(), m, 99);
  std::map<Task, int> seen;
  const int n = 1500;
  for (int64_t i = 0; i < n; ++i) {
    const Sample x = s.sample(i);
    ++seen[x.task];
    if (x.task == Task::text) continue;
    // Masked targets are digits or the ", " between values; each masked run follows "Answer: "
    // (NIAH) or "key:" (MQAR); the last one is followed by kEos.
    std::string masked;
    int64_t runs = 0, last_end = -1;
    for (int64_t t = 0; t < m.seq_len; ++t) {
      if (!x.answer_mask[static_cast<size_t>(t)]) continue;
      const int32_t tok = x.tokens[static_cast<size_t>(t + 1)];
      ASSERT_TRUE((tok >= '0' && tok <= '9') || tok == ',' || tok == ' ') << tok;
      if (t == 0 || !x.answer_mask[static_cast<size_t>(t - 1)]) {
        ++runs;
        const std::string before = decode(x.tokens.data() + t - 7, 8);
        if (x.task == Task::mqar) {
          EXPECT_EQ(before.back(), ':') << before;
        } else {
          EXPECT_EQ(before, "Answer: ") << before;
        }
      }
      last_end = t + 1;
    }
    EXPECT_EQ(x.tokens[static_cast<size_t>(last_end + 1)], kEos);
    EXPECT_EQ(last_end + 1, m.seq_len);
    EXPECT_EQ(runs, x.task == Task::mqar ? m.retrieval.n_recall : 1) << task_name(x.task);
  }
  const int retrieval = n - seen[Task::text];
  // Binomial(1500, 0.3): mean 450, sd 17.7; the seed is fixed, the band is 4 sd.
  EXPECT_NEAR(retrieval, 450, 71);
  for (Task t : kAll) EXPECT_GE(seen[t], 50) << task_name(t);
}

TEST(Stream, SplitsAreDisjoint) {
  TempDir d("split");
  std::mt19937_64 rng(13);
  d.write("train.txt", words(rng, 20000, 'a', 'm'));
  d.write("valid.txt", words(rng, 6000, 'n', 'z'));
  const Corpus c = Corpus::load(d.path.string());
  MixConfig m;
  // 8191 is longer than the valid split (6000 bytes): the split is read cyclically.
  for (int64_t seq_len : {int64_t{1023}, int64_t{8191}}) {
    m.seq_len = seq_len;
    for (Split sp : {Split::train, Split::valid}) {
      const char lo = sp == Split::train ? 'a' : 'n', hi = sp == Split::train ? 'm' : 'z';
      const Stream s(c, m, 5, sp);
      for (int64_t i = 0; i < 30; ++i) {
        const Sample x = s.sample(i);
        for (size_t k = 1; k < x.tokens.size(); ++k) {
          const int32_t t = x.tokens[k];
          ASSERT_TRUE((t >= lo && t <= hi) || t == ' ' || t == '\n' || t == kEos)
              << split_name(sp) << " sample " << i << " token " << k << " = " << t;
        }
      }
    }
  }
  // Retrieval haystacks too: the prompt without its needles and question is split text.
  for (Split sp : {Split::train, Split::valid}) {
    const char lo = sp == Split::train ? 'a' : 'n', hi = sp == Split::train ? 'm' : 'z';
    for (Task t : kAll) {
      const RetrievalCase rc = make_retrieval(c, t, 3000, 0.4, 21, sp);
      std::string body = parse(rc).body;
      for (const std::string pat : {"The special magic number for ", "("}) {
        for (size_t p; (p = body.find(pat)) != std::string::npos;) {
          body.erase(p, body.find(t == Task::mqar ? ") " : ". ", p) + 2 - p);
        }
      }
      for (char ch : body) {
        ASSERT_TRUE((ch >= lo && ch <= hi) || ch == ' ' || ch == '\n')
            << split_name(sp) << " " << task_name(t) << " byte " << int(ch);
      }
    }
  }
}

TEST(Stream, BadConfigsThrow) {
  MixConfig m;
  m.seq_len = 32;
  expect_error([&] { Stream(builtin(), m, 1); }, "Stream", "seq_len = 32");
  m.seq_len = 256;
  m.retrieval_fraction = 1.5;
  expect_error([&] { Stream(builtin(), m, 1); }, "Stream", "retrieval_fraction");
  m.retrieval_fraction = 0.5;
  expect_error([&] { Stream(builtin(), m, 1); }, "Stream", "too short for task");
  m.seq_len = 1024;
  m.tasks = {Task::text};
  expect_error([&] { Stream(builtin(), m, 1); }, "Stream", "'text'");
  m.tasks = {};
  m.retrieval.n_recall = 20;
  expect_error([&] { Stream(builtin(), m, 1); }, "Stream", "n_recall = 20");
}

TEST(Retrieval, LengthsDepthAndRecoverableAnswers) {
  for (Task task : kAll) {
    for (int64_t len : {400, 1023, 4097, 16384}) {
      for (double depth : {0.0, 0.25, 0.5, 0.9, 1.0}) {
        const RetrievalCase c = make_retrieval(builtin(), task, len, depth, 3, Split::valid);
        SCOPED_TRACE(std::string(task_name(task)) + " len " + std::to_string(len) + " depth " + std::to_string(depth));
        ASSERT_EQ(static_cast<int64_t>(c.prompt.size()), len);
        EXPECT_EQ(c.context_len, len);
        EXPECT_EQ(c.task, task);
        EXPECT_EQ(c.prompt[0], kBos);
        for (size_t i = 1; i < c.prompt.size(); ++i) ASSERT_LT(c.prompt[i], 256);
        ASSERT_FALSE(c.answer.empty());
        const Parsed p = parse(c);
        // The placed needle: within [expected - 32, expected], expected = 1 + round(depth * (B - L)).
        ASSERT_FALSE(c.needle_pos.empty());
        const std::string prompt = str(c.prompt);  // "<bos>" takes 5 chars: offsets shift by 4
        const int64_t pos0 = c.needle_pos[0];
        const std::string at = prompt.substr(static_cast<size_t>(pos0 + 4));
        const bool mqar = task == Task::mqar;
        ASSERT_EQ(at.rfind(mqar ? "(" : "The special magic number for ", 0), 0u) << at.substr(0, 40);
        const int64_t l = static_cast<int64_t>(at.find(mqar ? ") " : ". ")) + 2;
        const int64_t b = len - 1 - static_cast<int64_t>(p.question.size());
        const int64_t expected = 1 + std::llround(depth * static_cast<double>(b - l));
        EXPECT_LE(pos0, expected);
        EXPECT_GE(pos0, expected - 32);
        for (int64_t q : c.needle_pos) {
          const std::string s = prompt.substr(static_cast<size_t>(q + 4), 29);
          EXPECT_TRUE(s.rfind(mqar ? "(" : "The special magic number for ", 0) == 0) << s;
        }
        const size_t n_asked = task == Task::niah_multivalue ? 3 : task == Task::niah_multiquery ? 2 : 1;
        EXPECT_EQ(c.needle_pos.size(), n_asked);
        // The answer can be read off the prompt.
        EXPECT_EQ(recover_answer(c), str(c.answer));
        // Deterministic in its arguments.
        EXPECT_EQ(make_retrieval(builtin(), task, len, depth, 3, Split::valid).prompt, c.prompt);
      }
    }
  }
  // Needle counts of the multi-needle tasks follow the config.
  RetrievalConfig rc;
  rc.n_distractors = 5;
  rc.n_values = 4;
  rc.n_queries = 3;
  rc.n_pairs = 30;
  rc.n_recall = 12;
  auto count = [](const std::string& s, const std::string& pat) {
    int n = 0;
    for (size_t p = s.find(pat); p != std::string::npos; p = s.find(pat, p + 1)) ++n;
    return n;
  };
  const auto mk = make_retrieval(builtin(), Task::niah_multikey, 4000, 0.3, 9, Split::train, rc);
  EXPECT_EQ(count(parse(mk).body, "The special magic number for "), 6);
  const auto mv = make_retrieval(builtin(), Task::niah_multivalue, 4000, 0.3, 9, Split::train, rc);
  EXPECT_EQ(mv.needle_pos.size(), 4u);
  EXPECT_EQ(count(str(mv.answer), ", "), 3);
  const auto mq = make_retrieval(builtin(), Task::niah_multiquery, 4000, 0.3, 9, Split::train, rc);
  EXPECT_EQ(count(str(mq.answer), ", "), 2);
  EXPECT_EQ(recover_answer(mq), str(mq.answer));
  const auto ar = make_retrieval(builtin(), Task::mqar, 4000, 0.3, 9, Split::train, rc);
  const std::string body = parse(ar).body;
  const std::regex pair_re("\\([a-z]{4}:[0-9]{3}\\) ");
  EXPECT_EQ(std::distance(std::sregex_iterator(body.begin(), body.end(), pair_re), std::sregex_iterator()), 30);
  EXPECT_EQ(count(parse(ar).question, ":"), 13);  // "Recall:" and 12 keys
  EXPECT_EQ(recover_answer(ar), str(ar.answer));
}

TEST(Retrieval, DepthsSeedsAndSplitsGiveDifferentCases) {
  const auto a = make_retrieval(builtin(), Task::niah_single, 2048, 0.2, 1, Split::valid);
  const auto b = make_retrieval(builtin(), Task::niah_single, 2048, 0.2, 2, Split::valid);
  const auto c = make_retrieval(builtin(), Task::niah_single, 2048, 0.7, 1, Split::valid);
  const auto d = make_retrieval(builtin(), Task::niah_single, 2048, 0.2, 1, Split::train);
  EXPECT_NE(a.prompt, b.prompt);
  EXPECT_NE(a.prompt, c.prompt);
  EXPECT_NE(a.prompt, d.prompt);
  EXPECT_LT(a.needle_pos[0], c.needle_pos[0]);
}

TEST(Retrieval, BadArgumentsThrow) {
  expect_error([] { make_retrieval(builtin(), Task::text, 1000, 0.5, 1, Split::valid); }, "make_retrieval",
               "task = text");
  expect_error([] { make_retrieval(builtin(), Task::mqar, 1000, 1.5, 1, Split::valid); }, "make_retrieval",
               "depth = 1.5");
  expect_error([] { make_retrieval(builtin(), Task::niah_multikey, 100, 0.5, 1, Split::valid); }, "make_retrieval",
               "context_len = 100");
  RetrievalConfig rc;
  rc.value_digits = 1;
  expect_error([&] { make_retrieval(builtin(), Task::niah_single, 1000, 0.5, 1, Split::valid, rc); }, "make_retrieval",
               "value_digits = 1");
}
