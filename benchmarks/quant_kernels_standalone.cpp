// Torch-free check and microbenchmark of the packed-block kernels (csrc/cpu/quant_kernel_*.cpp): random
// blocks and int8 activations; every SIMD kernel against the plain one (max abs difference), and its
// single-thread GB/s of packed weights (thread CPU time by default, so a busy machine shows the kernel's own
// speed; -DQK_CLOCK=CLOCK_MONOTONIC for wall time). It does not check cpuid: run it on an AVX-512 VNNI CPU.
//
//   g++ -O3 -march=x86-64-v2 -Icsrc benchmarks/quant_kernels_standalone.cpp csrc/cpu/quant_kernel_*.cpp -o qk
//   ./qk K N T [reps]        e.g. ./qk 576 49152 1 20   (the LM head of SmolLM2, one decode row)
#include <chrono>
#include <time.h>
#ifndef QK_CLOCK
#define QK_CLOCK CLOCK_THREAD_CPUTIME_ID
#endif
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>
#include "cpu/quant_kernels.h"
using namespace layerskip::quant;
static uint16_t f2h(float f){ // crude: via _cvtss_sh not available w/o f16c; use bit method for normal range
  uint32_t x; memcpy(&x,&f,4); uint32_t s=(x>>16)&0x8000; int e=((x>>23)&0xff)-127+15; uint32_t m=(x>>13)&0x3ff;
  if(e<=0) return s; if(e>=31) return s|0x7c00; return s|(e<<10)|m;}
int main(int argc,char**argv){
  int K=atoi(argv[1]), N=atoi(argv[2]), T=atoi(argv[3]); int reps=argc>4?atoi(argv[4]):0;
  std::mt19937 g(1); std::uniform_int_distribution<int> byte(0,255); std::normal_distribution<float> nd;
  int fmts[3]={kQ8_0,kQ4_0,kQ4_1};
  for(int f: fmts){
    int64_t bb=block_bytes(f), nb=K/32, rb=nb*bb;
    std::vector<uint8_t> w(N*rb); for(auto&b:w) b=byte(g);
    for(int64_t i=0;i<N*nb;i++){ uint16_t d=f2h(0.01f*(1+nd(g)*0.1f)); memcpy(&w[i*bb],&d,2); if(f==kQ4_1){uint16_t m=f2h(-0.05f); memcpy(&w[i*bb+2],&m,2);} }
    std::vector<int8_t> q(T*K); for(auto&x:q) x=(int8_t)(byte(g)%255-127);
    std::vector<float> sc(T*nb), sm(T*nb); for(auto&x:sc) x=0.01f+0.001f*byte(g); for(auto&x:sm) x=nd(g);
    std::vector<float> qs(T*nb); for(int64_t i=0;i<T*nb;i++){int c=0; for(int j=0;j<32;j++) c+=q[i*32+j]; qs[i]=sc[i]*c;}
    QuantizedActivations a{q.data(),sc.data(),sm.data(),qs.data(),T,K};
    std::vector<float> ref(T*N), out(T*N);
    rows_plain(f,w.data(),rb,0,N,a,ref.data(),N);
    RowsKernel ks[3]={rows_avx2,rows_avx512,rows_avx512vnni}; const char* names[3]={"avx2","avx512","vnni"};
    for(int k=0;k<3;k++){
      std::fill(out.begin(),out.end(),NAN);
      ks[k](f,w.data(),rb,0,N,a,out.data(),N);
      double maxe=0,maxr=0; for(int i=0;i<T*N;i++){maxe=std::max(maxe,(double)std::fabs(out[i]-ref[i])); maxr=std::max(maxr,(double)std::fabs(ref[i]));}
      double gbs=0;
      if(reps){ timespec a0,a1; clock_gettime(QK_CLOCK,&a0); for(int r=0;r<reps;r++) ks[k](f,w.data(),rb,0,N,a,out.data(),N);
        clock_gettime(QK_CLOCK,&a1); double s=((a1.tv_sec-a0.tv_sec)+1e-9*(a1.tv_nsec-a0.tv_nsec))/reps; gbs=N*rb/s/1e9;}
      printf("fmt %d %s: maxerr %.3g (max |ref| %.3g)  %.1f GB/s\n",f,names[k],maxe,maxr,gbs);
    }
  }
}
