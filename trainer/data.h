// trainer/data.h — the trainer's data: byte-level tokens, the natural-text corpus, the training
// mix of text and long-context retrieval documents, and retrieval cases for evaluation. For the
// trainer (msa train / msa eval); torch-free (library msa_data). docs/data.md explains the tasks.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace msa::data {

// ---- Tokens -------------------------------------------------------------------------------------
// A token is a byte (0..255) or one of the special tokens below. Text never contains specials, so
// encode/decode of bytes is the identity.
constexpr int32_t kBos = 256;  // first token of every training sample and retrieval prompt
constexpr int32_t kEos = 257;  // ends a retrieval document (after its answer) in training samples
constexpr int32_t kPad = 258;  // never produced by a Stream; for callers that pad ragged batches
constexpr int32_t kNumSpecial = 3;
constexpr int32_t kVocab = 256 + kNumSpecial;  // 259; embedding rows needed (pad it up if you like)

std::vector<int32_t> encode(std::string_view text);  // bytes -> tokens 0..255
// Bytes as they are; specials as "<bos>", "<eos>", "<pad>"; anything else as "<?N>".
std::string decode(const int32_t* tokens, int64_t n);
std::string decode(const std::vector<int32_t>& tokens);

// ---- Corpus -------------------------------------------------------------------------------------
enum class Split { train, valid };
const char* split_name(Split s);

// Natural text, held as bytes. The valid split is text[valid_begin, end), the train split
// text[0, valid_begin): disjoint byte ranges, so no training sample reads validation text.
struct Corpus {
  std::string text;         // every file's bytes, in path order, files separated by "\n\n"
  std::string source;       // where it came from, for logs: a path or "built-in"
  int64_t valid_begin = 0;  // start of the valid split in text; 0 < valid_begin < text.size()

  // path_or_empty:
  //   ""          -> the built-in fallback text (a few hundred KB, deterministic, compiled in);
  //                  its last 48 KiB (cut at a line start) are the valid split.
  //   a file      -> that file; the last 5% (cut at a line start) is the valid split.
  //   a directory -> if it holds train.txt and valid.txt (scripts/prepare_corpus.sh writes them)
  //                  those two are the splits; otherwise every regular file with a text
  //                  extension (.txt .rst .md .py .c .h .cc .cpp .hpp .rs .go .java .js .sh .tex
  //                  .html .xml .json .yaml .toml .cfg .ini), found recursively and sorted by path
  //                  (bytewise), concatenated; the last 5% is the valid split.
  // Throws msa::Error when the path does not exist, holds no text, or gives a split shorter
  // than 1 KiB.
  static Corpus load(const std::string& path_or_empty);
  static Corpus builtin();  // same as load("")

  std::string_view split(Split s) const;  // the byte range of s
};

// ---- Tasks --------------------------------------------------------------------------------------
// Retrieval tasks hide facts ("needles") in natural text and ask for them at the end; all answers
// are digits. Examples in docs/data.md.
enum class Task {
  text,             // plain corpus text, no answer
  niah_single,      // one needle "The special magic number for <key> is <value>."; asked once
  niah_multikey,    // the asked needle plus RetrievalConfig::n_distractors needles of other keys
  niah_multivalue,  // n_values needles with the same key; the answer lists every value in order
  niah_multiquery,  // n_queries needles of different keys, all asked; answers in asked order
  mqar,             // multi-query associative recall: n_pairs "key:value" pairs scattered in the
                    // text, then a recall list "key:value ..." where every value is an answer
};
Task parse_task(std::string_view name);  // the enum names above; throws msa::Error otherwise
const char* task_name(Task t);
std::vector<Task> parse_tasks(std::string_view comma_list);  // "niah_single,mqar"; "all" = every
                                                             // retrieval task

// Sizes of the retrieval documents. Defaults suit 1K..32K contexts.
struct RetrievalConfig {
  int32_t n_distractors = 3;  // niah_multikey: needles with other keys besides the asked one
  int32_t n_values = 3;       // niah_multivalue: values stored under the asked key
  int32_t n_queries = 2;      // niah_multiquery: keys asked (and needles) in one question
  int32_t value_digits = 6;   // NIAH values: this many decimal digits, first digit nonzero
  int32_t n_pairs = 16;       // mqar: key:value pairs hidden in the text
  int32_t n_recall = 8;       // mqar: pairs asked in the recall list (<= n_pairs)
  int32_t pair_digits = 3;    // mqar: digits per value; keys are 4 lowercase letters
};

// ---- Training mix -------------------------------------------------------------------------------
struct MixConfig {
  int64_t seq_len = 1024;           // model inputs per sample; a Sample holds seq_len + 1 tokens
  double retrieval_fraction = 0.0;  // probability that a sample is a retrieval document
  std::vector<Task> tasks;          // retrieval tasks drawn uniformly; empty = every retrieval task
  RetrievalConfig retrieval;        // sizes of the retrieval documents
};

struct Sample {
  // [seq_len + 1]: inputs are tokens[0, seq_len), targets tokens[1, seq_len + 1). tokens[0] is
  // kBos. A text sample is corpus bytes starting at a line start (the split is read cyclically,
  // kEos joining its end to its start). A retrieval sample is kBos, haystack with needles, the
  // question, the answer, kEos, filling seq_len + 1 exactly.
  std::vector<int32_t> tokens;
  // [seq_len]: 1 where target tokens[t + 1] belongs to an answer (a recalled value, with the ", "
  // between values of a multi-value answer; for mqar every value of the recall list), else 0.
  // All zero for text samples. For per-task retrieval loss/accuracy.
  std::vector<uint8_t> answer_mask;
  Task task = Task::text;  // what this sample is
};

// The training (or validation) stream: sample(index) is a pure function of (corpus split, config,
// seed, index), so a run resumes exactly at a data position by storing the next index, and two
// Streams with the same arguments agree sample by sample. Thread-safe (const, no state).
// Holds a reference to the corpus: the Corpus must outlive the Stream.
class Stream {
 public:
  // Throws msa::Error if seq_len < 64, retrieval_fraction is outside [0, 1], tasks holds
  // Task::text, or a retrieval config value is out of range.
  Stream(const Corpus& corpus, MixConfig config, uint64_t seed, Split split = Split::train);
  Sample sample(int64_t index) const;  // index >= 0
  const MixConfig& config() const { return config_; }
  Split split() const { return split_; }

 private:
  const Corpus* corpus_;
  MixConfig config_;
  uint64_t seed_;
  Split split_;
};

// ---- Evaluation cases ---------------------------------------------------------------------------
struct RetrievalCase {
  std::vector<int32_t> prompt;  // [context_len] kBos, haystack with needles, question; the model
                                // continues it
  std::vector<int32_t> answer;  // the expected continuation (digits, ", " between values); correct
                                // iff greedy decoding of answer.size() tokens reproduces it. Same as:
                                // argmax at every answer position of prompt + answer (one forward
                                // pass, teacher forced) equals the answer token.
  Task task = Task::niah_single;
  int64_t context_len = 0;  // == prompt.size()
  double depth = 0;         // requested needle depth in [0, 1]: 0 = right after kBos, 1 = just
                            // before the question
  // Token offsets in prompt of the first byte of each needle that the question asks about (for
  // mqar: the asked-last pair only), in the order the needles were made: the first is the one
  // placed at the depth, the others (multivalue, multiquery) at random positions. With
  // B = context_len - 1 - (question length) the body between kBos and the question and L the
  // first needle's length, needle_pos[0] lies in [1 + round(depth * (B - L)) - 32, ... + 0]
  // (moved back by up to 32 bytes to start at a word).
  std::vector<int64_t> needle_pos;
};

// A retrieval prompt of exactly context_len tokens whose haystack comes from split s of the corpus.
// For mqar the recall list is in the prompt with its values, except the last pair's value, which
// is the answer. Deterministic in all arguments. Throws msa::Error if task is Task::text, depth is
// outside [0, 1], or context_len is too short for the needles and question (512 tokens is always
// enough with the default RetrievalConfig; the message gives the minimum).
RetrievalCase make_retrieval(const Corpus& corpus, Task task, int64_t context_len, double depth, uint64_t seed, Split s,
                             const RetrievalConfig& config = {});

}  // namespace msa::data
