// The draft-length decision of mtp_cy.Batch(n_draft="auto"), in three small parts:
//
//   mtp_cy_cost_model   what a decode costs on this hardware, by the number of tokens
//                       in it (measured: one target decode verifies B*(k+1) tokens of B
//                       sequences; the MTP head decodes one token per drafting sequence
//                       and draft depth, and feeds the verified tokens back);
//   mtp_cy_acceptance   how often a draft at position i survives verification when the
//                       ones before it did, per sequence, with the batch's experience as
//                       the prior of a new sequence;
//   mtp_cy_decide()     the draft length for the batch as it is now: the k that gives
//                       the most tokens per second, expected tokens of every sequence
//                       over the predicted cost of the step, 0 (plain steps) where the
//                       batch is compute-bound; it measures a length it knows too little
//                       about, now and then.
//
// Every quantity is measured in this process; nothing is assumed about the hardware.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

// Cost of a decode by the number of tokens in it (microseconds): a running mean per
// size (the latest measurements weigh most), interpolated between measured sizes and
// extrapolated linearly past the largest one.
struct mtp_cy_cost_model {
    static constexpr int TMAX = 2048;
    std::vector<double> us;
    std::vector<int64_t> n;

    mtp_cy_cost_model() { reset(); }

    void reset() {
        us.assign(TMAX + 1, 0.0);
        n.assign(TMAX + 1, 0);
    }

    void observe(int t, double v) {
        if (t <= 0 || v <= 0) {
            return;
        }
        t = std::min(t, TMAX);
        n[t] += 1;
        const double w = std::max(0.125, 1.0 / (double) n[t]);
        us[t] += w * (v - us[t]);
    }

    int64_t count(int t) const { return (t > 0 && t <= TMAX) ? n[t] : 0; }

    // predicted microseconds of a decode of t tokens (0 when nothing was measured yet)
    double predict(int t) const {
        if (t <= 0) {
            return 0.0;
        }
        t = std::min(t, TMAX);
        if (n[t] > 0) {
            return us[t];
        }
        int lo = t - 1, hi = t + 1;
        while (lo > 0 && n[lo] == 0) --lo;
        while (hi <= TMAX && n[hi] == 0) ++hi;
        if (lo > 0 && hi <= TMAX) {
            const double f = (double) (t - lo) / (double) (hi - lo);
            return us[lo] + f * (us[hi] - us[lo]);
        }
        if (hi <= TMAX) {
            return us[hi];                     // below every measured size: no cheaper than... the smallest
        }
        if (lo <= 0) {
            return 0.0;
        }
        // past the largest measured size: the steeper of the slope of the two largest
        // ones and the mean slope from the smallest one (two close sizes give a noisy
        // slope, and a low one made drafting look cheap: "never lose" wants the dearer
        // guess, which the choice's own runs then measure), or (one point only)
        // proportional growth, the pessimistic guess for a compute-bound step
        int lo2 = lo - 1;
        while (lo2 > 0 && n[lo2] == 0) --lo2;
        if (lo2 > 0) {
            int first = 1;
            while (first < lo2 && n[first] == 0) ++first;
            double slope = (us[lo] - us[lo2]) / (double) (lo - lo2);
            slope = std::max(slope, (us[lo] - us[first]) / (double) (lo - first));
            return us[lo] + std::max(0.0, slope) * (double) (t - lo);
        }
        return us[lo] * (double) t / (double) lo;
    }
};

// Acceptance by draft position: reach[i] drafts at position i whose predecessors were
// accepted, acc[i] of them accepted (decayed counts, so that a change of text is followed).
struct mtp_cy_acceptance {
    static constexpr int KMAX = 16;
    double reach[KMAX + 1];
    double acc[KMAX + 1];
    double decay = 0.98;

    mtp_cy_acceptance() { reset(); }

    void reset() {
        for (int i = 0; i <= KMAX; ++i) {
            reach[i] = 0.0;
            acc[i] = 0.0;
        }
    }

    // one verification: k tokens drafted, the first n_acc accepted
    void observe(int k, int n_acc) {
        if (k <= 0) {
            return;
        }
        for (int i = 1; i <= std::min(k, KMAX); ++i) {
            if (i > n_acc + 1) {
                break;                          // not reached: an earlier draft was rejected
            }
            reach[i] = reach[i] * decay + 1.0;
            acc[i] = acc[i] * decay + (i <= n_acc ? 1.0 : 0.0);
        }
    }

    // P(position i accepted | 1..i-1 accepted); `prior` (may be null) supplies the
    // estimate a few observations here cannot, and the position before is the prior
    // of a position never reached
    double p(int i, const mtp_cy_acceptance * prior, double w = 4.0) const {
        if (i < 1 || i > KMAX) {
            return 0.0;
        }
        double pr;
        if (prior) {
            pr = prior->p(i, nullptr, 2.0);
        } else {
            pr = i > 1 ? p(i - 1, nullptr, w) : 0.5;
            if (reach[i] <= 0.0) {
                return pr;
            }
            w = 2.0;
        }
        return (acc[i] + w * pr) / (reach[i] + w);
    }

    // expected tokens of a verification that drafts k: the target's own token plus
    // the accepted run
    double expected(int k, const mtp_cy_acceptance * prior) const {
        double e = 1.0, run = 1.0;
        for (int i = 1; i <= std::min(k, KMAX); ++i) {
            run *= p(i, prior);
            e += run;
        }
        return e;
    }
};

// The choice for one step.
struct mtp_cy_decision {
    int k = 0;                  // draft length of the sequences that follow "auto"
    int n_seq = 0;              // sequences in the step
    double tokens_per_sec = 0;  // expected, at k
    double plain_tokens_per_sec = 0;
    const char * reason = "start";
};

// What the decision needs about one sequence of the step.
struct mtp_cy_seq_view {
    const mtp_cy_acceptance * acc;   // its acceptance
    int k_fixed;                     // -1: follows the decision; else its own length (0 = plain)
    int k_cap;                       // the most it may draft now (max_tokens / context left)
};

struct mtp_cy_batch_policy {
    int k_max = 4;
    mtp_cy_cost_model target;        // target decode cost by tokens verified
    mtp_cy_cost_model head;          // MTP-head decode cost by tokens in it
    mtp_cy_acceptance batch_acc;     // every sequence's experience: the prior of each one
    int64_t steps = 0;
    int64_t chosen[mtp_cy_acceptance::KMAX + 1] = {0};
    int run = 4;                     // a choice holds this many steps (same batch size): a decode of
                                     // a new shape rebuilds its graph, the runs after it reuse it
    int hold_left = 0;
    int hold_b = 0;
    // whole-step time by (batch size, k) where every sequence followed the decision: what a
    // step really costs (the parts' model misses sampling, graph rebuilds, the head's shapes);
    // used in place of the parts' sum once measured twice
    static constexpr int BMAX = 64;
    std::vector<double> step_us;
    std::vector<int64_t> step_n;
    int last_step_b = 0, last_step_k = -1;
    int64_t since_probe = 0;         // steps since the last re-measuring run
    int64_t n_probe = 0;
    double probe_budget = 0.004;     // (the switches cost more than the run's loss alone: graphs are rebuilt)
    double min_gain = 0.05;          // drafting is chosen when it beats plain steps by this much
    // what re-measuring runs really lost (the head's catch-up on the positions it missed, the
    // graphs rebuilt on the way in and out: more than the predicted scores say), by direction
    // (0: a longer draft than the choice, 1: a shorter one); a run is priced by the dearer of
    // this and its predicted loss
    double probe_loss[2] = {0.0, 0.0};
    int64_t probe_runs[2] = {0, 0};
    int probe_left = 0;              // steps of the running re-measuring run still to observe
    int probe_dir = 0;
    double probe_us = 0.0, probe_tok = 0.0, probe_best = 0.0;
    int last_t = 0;                  // tokens of the previous target decode
    mtp_cy_decision last;

    // A target decode of t tokens took us microseconds.  Only a decode of the same shape as
    // the one before counts: it reuses the graph, as the steps of a run do (the first step of
    // a run pays for a new graph, which the runs amortise; measured here it would make the
    // length a run leaves look dearer than it is).
    void observe_target(int t, double us) {
        if (t == last_t) {
            target.observe(t, us);
        }
        last_t = t;
    }

    // A whole step of b sequences that all drafted the decision's k took us microseconds
    // and gave `tokens` tokens (a re-measuring run is priced by what it really gave: the
    // acceptances it was chosen by are estimates, and a sequence's first drafts after a
    // plain stretch, by a head that missed what came before, are accepted less).
    void observe_step(int b, int k, double us, bool uniform, double tokens) {
        if (probe_left > 0 && us > 0) {
            probe_us += us;
            probe_tok += tokens;
            if (--probe_left == 0 && probe_best > 0) {
                const double l = std::max(0.0, 1.0 - probe_tok / probe_us * 1e6 / probe_best);
                double & e = probe_loss[probe_dir];
                e = probe_runs[probe_dir]++ == 0 ? l : 0.5 * e + 0.5 * l;
            }
        }
        const bool steady = uniform && b == last_step_b && k == last_step_k;
        last_step_b = uniform ? b : 0;
        last_step_k = uniform ? k : -1;
        if (!steady || b < 1 || b > BMAX || k < 0 || k > mtp_cy_acceptance::KMAX || us <= 0) {
            return;
        }
        const size_t i = (size_t) b * (mtp_cy_acceptance::KMAX + 1) + k;
        step_n[i] += 1;
        const double w = std::max(0.125, 1.0 / (double) step_n[i]);
        step_us[i] += w * (us - step_us[i]);
    }

    void configure(int kmax) {
        k_max = std::max(1, std::min(kmax, mtp_cy_acceptance::KMAX));
        target.reset();
        head.reset();
        batch_acc.reset();
        steps = 0;
        for (auto & c : chosen) c = 0;
        last = mtp_cy_decision();
        hold_left = 0;
        hold_b = 0;
        last_t = 0;
        step_us.assign((BMAX + 1) * (mtp_cy_acceptance::KMAX + 1), 0.0);
        step_n.assign((BMAX + 1) * (mtp_cy_acceptance::KMAX + 1), 0);
        last_step_b = 0;
        last_step_k = -1;
        since_probe = 0;
        n_probe = 0;
        probe_loss[0] = probe_loss[1] = 0.0;
        probe_runs[0] = probe_runs[1] = 0;
        probe_left = 0;
    }

    // the step's cost drafting k for the "auto" sequences: one target decode of every
    // sequence's tokens, one head decode per depth of the sequences still drafting, and
    // the head's catch-up on the tokens accepted (about the expected tokens)
    double cost(const std::vector<mtp_cy_seq_view> & seqs, int k, double * tokens) const {
        int t_tgt = 0, depth_n[mtp_cy_acceptance::KMAX + 1] = {0};
        double tok = 0.0, catch_tok = 0.0;
        for (const auto & s : seqs) {
            int kk = s.k_fixed >= 0 ? s.k_fixed : k;
            kk = std::max(0, std::min(kk, s.k_cap));
            t_tgt += 1 + kk;
            for (int d = 1; d <= kk; ++d) depth_n[d] += 1;
            const double e = s.acc->expected(kk, &batch_acc);
            tok += e;
            if (kk > 0) catch_tok += e;
        }
        if (tokens) *tokens = tok;
        // every sequence follows the decision: the measured whole step of (B, k) prices it,
        // also when some of them may draft fewer now (max_tokens / context: a step of shorter
        // drafts costs no more; their tokens above count what they can draft)
        const int B = (int) seqs.size();
        bool uniform = B >= 1 && B <= BMAX && k >= 0 && k <= mtp_cy_acceptance::KMAX && !step_n.empty();
        for (const auto & s : seqs) uniform = uniform && s.k_fixed < 0;
        if (uniform) {
            const size_t i = (size_t) B * (mtp_cy_acceptance::KMAX + 1) + k;
            if (step_n[i] >= 2) {
                return step_us[i];
            }
        }
        double c = target.predict(t_tgt);
        for (int d = 1; d <= mtp_cy_acceptance::KMAX; ++d) {
            if (depth_n[d] > 0) c += head.predict(depth_n[d]);
        }
        if (catch_tok > 0) c += head.predict((int) std::lround(catch_tok));
        return c;
    }

    mtp_cy_decision decide(const std::vector<mtp_cy_seq_view> & seqs) {
        mtp_cy_decision d;
        d.n_seq = (int) seqs.size();
        ++steps;
        const int B = (int) seqs.size();
        if (B == 0) {
            d.reason = "idle";
            return last = d;
        }
        ++since_probe;
        if (hold_left > 0 && B == hold_b) {
            --hold_left;
            d = last;
            chosen[std::max(0, std::min(d.k, mtp_cy_acceptance::KMAX))] += 1;
            return d;
        }
        // what is measured first at a batch size: plain steps, then drafts of 1 (two points of
        // the verification cost, V(B) and V(2B)); every other length is predicted from the
        // measured sizes (interpolated, extrapolated with the slope of the two largest) and
        // measured when it is the choice (its runs) or a neighbour of it (re-measuring)
        int cap = k_max;
        for (const auto & s : seqs) cap = std::min(cap, s.k_fixed >= 0 ? k_max : s.k_cap);
        d.reason = nullptr;
        if (target.count(B) < 2) {
            d.k = 0;
            d.reason = "measuring";
        } else if (cap >= 1 && target.count(2 * B) < 2) {
            d.k = 1;
            d.reason = "measuring";
        }
        probe_left = 0;                  // (a run cut short by a change of batch is not priced)
        double best = -1.0, plain = 0.0;
        double score[mtp_cy_acceptance::KMAX + 1] = {0};
        int kbest = 0;
        for (int k = 0; k <= k_max; ++k) {
            double tok = 0.0;
            const double c = cost(seqs, k, &tok);
            const double s = c > 0 ? tok / c * 1e6 : 0.0;
            score[k] = s;
            if (k == 0) plain = s;
            if (s > best) {
                best = s;
                kbest = k;
            }
        }
        // drafting must win clearly: a close call costs more than its score says (entering and
        // leaving it rebuilds graphs and feeds the head what it missed, which the steady
        // steps measured above leave out), so within min_gain of plain steps, plain steps
        if (kbest > 0 && best < plain * (1.0 + min_gain)) {
            kbest = 0;
            best = plain;
        }
        d.plain_tokens_per_sec = plain;
        if (d.reason == nullptr) {
            d.k = kbest;
            d.reason = kbest == 0 ? "plain is faster" : "best";
            if (target.count(B * (1 + kbest)) < 2) {
                d.reason = "measuring";      // the choice, on a prediction: its runs measure it
            }
            // keep the neighbours' costs current: now and then a run at k-1 or k+1, priced by
            // what it loses against the choice (predicted, or what such runs really lost when
            // that was more): at most `probe_budget` of the steps' value (a close neighbour is
            // re-measured often, a far one rarely)
            const int alt = (n_probe % 2 == 0) ? kbest + 1 : kbest - 1;
            if (alt >= 0 && alt <= k_max && best > 0) {
                const int dir = alt > kbest ? 0 : 1;
                const double loss = std::max({0.05, 1.0 - score[alt] / best, probe_loss[dir]});
                if ((double) since_probe * probe_budget >= (double) run * loss) {
                    d.k = alt;
                    d.reason = "re-measuring";
                    since_probe = 0;
                    ++n_probe;
                    probe_left = run;
                    probe_dir = dir;
                    probe_us = probe_tok = 0.0;
                    probe_best = best;
                }
            } else {
                ++n_probe;
            }
        }
        {
            double tok = 0.0;
            const double c = cost(seqs, d.k, &tok);
            d.tokens_per_sec = c > 0 ? tok / c * 1e6 : 0.0;
        }
        chosen[std::max(0, std::min(d.k, mtp_cy_acceptance::KMAX))] += 1;
        hold_left = run - 1;
        hold_b = B;
        return last = d;
    }
};
