# Copyright (c) 2020, NVIDIA CORPORATION. All rights reserved.
#
# Redistribution and use in source and binary forms, with or without
# modification, are permitted provided that the following conditions
# are met:
#  * Redistributions of source code must retain the above copyright
#    notice, this list of conditions and the following disclaimer.
#  * Redistributions in binary form must reproduce the above copyright
#    notice, this list of conditions and the following disclaimer in the
#    documentation and/or other materials provided with the distribution.
#  * Neither the name of NVIDIA CORPORATION nor the names of its
#    contributors may be used to endorse or promote products derived
#    from this software without specific prior written permission.
#
# THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS ``AS IS'' AND ANY
# EXPRESS OR IMPLIED WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE
# IMPLIED WARRANTIES OF MERCHANTABILITY AND FITNESS FOR A PARTICULAR
# PURPOSE ARE DISCLAIMED.  IN NO EVENT SHALL THE COPYRIGHT OWNER OR
# CONTRIBUTORS BE LIABLE FOR ANY DIRECT, INDIRECT, INCIDENTAL, SPECIAL,
# EXEMPLARY, OR CONSEQUENTIAL DAMAGES (INCLUDING, BUT NOT LIMITED TO,
# PROCUREMENT OF SUBSTITUTE GOODS OR SERVICES; LOSS OF USE, DATA, OR
# PROFITS; OR BUSINESS INTERRUPTION) HOWEVER CAUSED AND ON ANY THEORY
# OF LIABILITY, WHETHER IN CONTRACT, STRICT LIABILITY, OR TORT
# (INCLUDING NEGLIGENCE OR OTHERWISE) ARISING IN ANY WAY OUT OF THE USE
# OF THIS SOFTWARE, EVEN IF ADVISED OF THE POSSIBILITY OF SUCH DAMAGE.

"""Triton's ``model_config.proto`` as a serialized ``FileDescriptorProto`` (vendored).

Taken by ``stages/serve/triton/vendor.py`` from NVIDIA's ``tritonclient-2.73.0`` wheel
(``tritonclient/grpc/model_config_pb2.py``, protoc 6.33.5), which is built from
triton-inference-server/common's ``protobuf/`` directory under the BSD-3-Clause license above.
Do not edit: re-run the vendor script.
"""

SERIALIZED = (
    b'\n\x12model_config.proto\x12\tinference"\x96\x01\n\x10ModelRateLimiter\x127\n\tresources\x18\x01 '
    b'\x03(\x0b2$.inference.ModelRateLimiter.Resource\x12\x10\n\x08priority\x18\x02 \x01(\r\x1a7\n\x08R'
    b'esource\x12\x0c\n\x04name\x18\x01 \x01(\t\x12\x0e\n\x06global\x18\x02 \x01(\x08\x12\r\n\x05count'
    b'\x18\x03 \x01(\r"\x87\x04\n\x12ModelInstanceGroup\x12\x0c\n\x04name\x18\x01 \x01(\t\x120\n\x04kin'
    b'd\x18\x04 \x01(\x0e2".inference.ModelInstanceGroup.Kind\x12\r\n\x05count\x18\x02 \x01(\x05\x121\n'
    b'\x0crate_limiter\x18\x06 \x01(\x0b2\x1b.inference.ModelRateLimiter\x12\x0c\n\x04gpus\x18\x03 \x03'
    b'(\x05\x12H\n\x11secondary_devices\x18\x08 \x03(\x0b2-.inference.ModelInstanceGroup.SecondaryDevic'
    b'e\x12\x0f\n\x07profile\x18\x05 \x03(\t\x12\x0f\n\x07passive\x18\x07 \x01(\x08\x12\x13\n\x0bhost_p'
    b'olicy\x18\t \x01(\t\x1a\x9c\x01\n\x0fSecondaryDevice\x12O\n\x04kind\x18\x01 \x01(\x0e2A.inference'
    b'.ModelInstanceGroup.SecondaryDevice.SecondaryDeviceKind\x12\x11\n\tdevice_id\x18\x02 \x01(\x03"%'
    b'\n\x13SecondaryDeviceKind\x12\x0e\n\nKIND_NVDLA\x10\x00"A\n\x04Kind\x12\r\n\tKIND_AUTO\x10\x00'
    b'\x12\x0c\n\x08KIND_GPU\x10\x01\x12\x0c\n\x08KIND_CPU\x10\x02\x12\x0e\n\nKIND_MODEL\x10\x03"#\n'
    b'\x12ModelTensorReshape\x12\r\n\x05shape\x18\x01 \x03(\x03"\xd3\x02\n\nModelInput\x12\x0c\n\x04nam'
    b'e\x18\x01 \x01(\t\x12&\n\tdata_type\x18\x02 \x01(\x0e2\x13.inference.DataType\x12,\n\x06format'
    b'\x18\x03 \x01(\x0e2\x1c.inference.ModelInput.Format\x12\x0c\n\x04dims\x18\x04 \x03(\x03\x12.\n'
    b'\x07reshape\x18\x05 \x01(\x0b2\x1d.inference.ModelTensorReshape\x12\x17\n\x0fis_shape_tensor\x18'
    b'\x06 \x01(\x08\x12\x1a\n\x12allow_ragged_batch\x18\x07 \x01(\x08\x12\x10\n\x08optional\x18\x08 '
    b'\x01(\x08\x12\x1f\n\x17is_non_linear_format_io\x18\t \x01(\x08";\n\x06Format\x12\x0f\n\x0bFORMAT_'
    b'NONE\x10\x00\x12\x0f\n\x0bFORMAT_NHWC\x10\x01\x12\x0f\n\x0bFORMAT_NCHW\x10\x02"\xd3\x01\n\x0bMode'
    b'lOutput\x12\x0c\n\x04name\x18\x01 \x01(\t\x12&\n\tdata_type\x18\x02 \x01(\x0e2\x13.inference.Data'
    b'Type\x12\x0c\n\x04dims\x18\x03 \x03(\x03\x12.\n\x07reshape\x18\x05 \x01(\x0b2\x1d.inference.Model'
    b'TensorReshape\x12\x16\n\x0elabel_filename\x18\x04 \x01(\t\x12\x17\n\x0fis_shape_tensor\x18\x06 '
    b'\x01(\x08\x12\x1f\n\x17is_non_linear_format_io\x18\x07 \x01(\x08"\xd9\x02\n\nBatchInput\x12(\n'
    b'\x04kind\x18\x01 \x01(\x0e2\x1a.inference.BatchInput.Kind\x12\x13\n\x0btarget_name\x18\x02 \x03('
    b'\t\x12&\n\tdata_type\x18\x03 \x01(\x0e2\x13.inference.DataType\x12\x14\n\x0csource_input\x18\x04 '
    b'\x03(\t"\xcd\x01\n\x04Kind\x12\x17\n\x13BATCH_ELEMENT_COUNT\x10\x00\x12#\n\x1fBATCH_ACCUMULATED_E'
    b'LEMENT_COUNT\x10\x01\x12-\n)BATCH_ACCUMULATED_ELEMENT_COUNT_WITH_ZERO\x10\x02\x12$\n BATCH_MAX_EL'
    b'EMENT_COUNT_AS_SHAPE\x10\x03\x12\x14\n\x10BATCH_ITEM_SHAPE\x10\x04\x12\x1c\n\x18BATCH_ITEM_SHAPE_'
    b'FLATTEN\x10\x05"\x8f\x01\n\x0bBatchOutput\x12\x13\n\x0btarget_name\x18\x01 \x03(\t\x12)\n\x04kind'
    b'\x18\x02 \x01(\x0e2\x1b.inference.BatchOutput.Kind\x12\x14\n\x0csource_input\x18\x03 \x03(\t"*\n'
    b'\x04Kind\x12"\n\x1eBATCH_SCATTER_WITH_INPUT_SHAPE\x10\x00"\x90\x02\n\x12ModelVersionPolicy\x126\n'
    b'\x06latest\x18\x01 \x01(\x0b2$.inference.ModelVersionPolicy.LatestH\x00\x120\n\x03all\x18\x02 '
    b'\x01(\x0b2!.inference.ModelVersionPolicy.AllH\x00\x12:\n\x08specific\x18\x03 \x01(\x0b2&.inferenc'
    b'e.ModelVersionPolicy.SpecificH\x00\x1a\x1e\n\x06Latest\x12\x14\n\x0cnum_versions\x18\x01 \x01(\r'
    b'\x1a\x05\n\x03All\x1a\x1c\n\x08Specific\x12\x10\n\x08versions\x18\x01 \x03(\x03B\x0f\n\rpolicy_ch'
    b'oice"\xfd\r\n\x17ModelOptimizationPolicy\x127\n\x05graph\x18\x01 \x01(\x0b2(.inference.ModelOptim'
    b'izationPolicy.Graph\x12B\n\x08priority\x18\x02 \x01(\x0e20.inference.ModelOptimizationPolicy.Mode'
    b"lPriority\x125\n\x04cuda\x18\x03 \x01(\x0b2'.inference.ModelOptimizationPolicy.Cuda\x12X\n\x16exe"
    b'cution_accelerators\x18\x04 \x01(\x0b28.inference.ModelOptimizationPolicy.ExecutionAccelerators'
    b'\x12R\n\x13input_pinned_memory\x18\x05 \x01(\x0b25.inference.ModelOptimizationPolicy.PinnedMemory'
    b'Buffer\x12S\n\x14output_pinned_memory\x18\x06 \x01(\x0b25.inference.ModelOptimizationPolicy.Pinne'
    b'dMemoryBuffer\x12&\n\x1egather_kernel_buffer_threshold\x18\x07 \x01(\r\x12\x16\n\x0eeager_batchin'
    b'g\x18\x08 \x01(\x08\x1a\x16\n\x05Graph\x12\r\n\x05level\x18\x01 \x01(\x05\x1a\xba\x05\n\x04Cuda'
    b'\x12\x0e\n\x06graphs\x18\x01 \x01(\x08\x12\x18\n\x10busy_wait_events\x18\x02 \x01(\x08\x12E\n\ngr'
    b'aph_spec\x18\x03 \x03(\x0b21.inference.ModelOptimizationPolicy.Cuda.GraphSpec\x12\x1a\n\x12output'
    b'_copy_stream\x18\x04 \x01(\x08\x1a\xa4\x04\n\tGraphSpec\x12\x12\n\nbatch_size\x18\x01 \x01(\x05'
    b'\x12K\n\x05input\x18\x02 \x03(\x0b2<.inference.ModelOptimizationPolicy.Cuda.GraphSpec.InputEntry'
    b'\x12W\n\x11graph_lower_bound\x18\x03 \x01(\x0b2<.inference.ModelOptimizationPolicy.Cuda.GraphSpec'
    b'.LowerBound\x1a\x14\n\x05Shape\x12\x0b\n\x03dim\x18\x01 \x03(\x03\x1a\xdf\x01\n\nLowerBound\x12'
    b'\x12\n\nbatch_size\x18\x01 \x01(\x05\x12V\n\x05input\x18\x02 \x03(\x0b2G.inference.ModelOptimizat'
    b'ionPolicy.Cuda.GraphSpec.LowerBound.InputEntry\x1ae\n\nInputEntry\x12\x0b\n\x03key\x18\x01 \x01('
    b'\t\x12F\n\x05value\x18\x02 \x01(\x0b27.inference.ModelOptimizationPolicy.Cuda.GraphSpec.Shape:'
    b'\x028\x01\x1ae\n\nInputEntry\x12\x0b\n\x03key\x18\x01 \x01(\t\x12F\n\x05value\x18\x02 \x01(\x0b27'
    b'.inference.ModelOptimizationPolicy.Cuda.GraphSpec.Shape:\x028\x01\x1a\xa4\x03\n\x15ExecutionAccel'
    b'erators\x12g\n\x19gpu_execution_accelerator\x18\x01 \x03(\x0b2D.inference.ModelOptimizationPolicy'
    b'.ExecutionAccelerators.Accelerator\x12g\n\x19cpu_execution_accelerator\x18\x02 \x03(\x0b2D.infere'
    b'nce.ModelOptimizationPolicy.ExecutionAccelerators.Accelerator\x1a\xb8\x01\n\x0bAccelerator\x12'
    b'\x0c\n\x04name\x18\x01 \x01(\t\x12h\n\nparameters\x18\x02 \x03(\x0b2T.inference.ModelOptimization'
    b'Policy.ExecutionAccelerators.Accelerator.ParametersEntry\x1a1\n\x0fParametersEntry\x12\x0b\n\x03k'
    b'ey\x18\x01 \x01(\t\x12\r\n\x05value\x18\x02 \x01(\t:\x028\x01\x1a$\n\x12PinnedMemoryBuffer\x12'
    b'\x0e\n\x06enable\x18\x01 \x01(\x08"I\n\rModelPriority\x12\x14\n\x10PRIORITY_DEFAULT\x10\x00\x12'
    b'\x10\n\x0cPRIORITY_MAX\x10\x01\x12\x10\n\x0cPRIORITY_MIN\x10\x02"\xdb\x01\n\x10ModelQueuePolicy'
    b'\x12A\n\x0etimeout_action\x18\x01 \x01(\x0e2).inference.ModelQueuePolicy.TimeoutAction\x12$\n\x1c'
    b'default_timeout_microseconds\x18\x02 \x01(\x04\x12\x1e\n\x16allow_timeout_override\x18\x03 \x01('
    b'\x08\x12\x16\n\x0emax_queue_size\x18\x04 \x01(\r"&\n\rTimeoutAction\x12\n\n\x06REJECT\x10\x00\x12'
    b'\t\n\x05DELAY\x10\x01"\x9b\x03\n\x14ModelDynamicBatching\x12\x1c\n\x14preferred_batch_size\x18'
    b'\x01 \x03(\x05\x12$\n\x1cmax_queue_delay_microseconds\x18\x02 \x01(\x04\x12\x19\n\x11preserve_ord'
    b'ering\x18\x03 \x01(\x08\x12\x17\n\x0fpriority_levels\x18\x04 \x01(\x04\x12\x1e\n\x16default_prior'
    b'ity_level\x18\x05 \x01(\x04\x129\n\x14default_queue_policy\x18\x06 \x01(\x0b2\x1b.inference.Model'
    b'QueuePolicy\x12W\n\x15priority_queue_policy\x18\x07 \x03(\x0b28.inference.ModelDynamicBatching.Pr'
    b'iorityQueuePolicyEntry\x1aW\n\x18PriorityQueuePolicyEntry\x12\x0b\n\x03key\x18\x01 \x01(\x04\x12*'
    b'\n\x05value\x18\x02 \x01(\x0b2\x1b.inference.ModelQueuePolicy:\x028\x01"\xee\n\n\x15ModelSequence'
    b'Batching\x12A\n\x06direct\x18\x03 \x01(\x0b2/.inference.ModelSequenceBatching.StrategyDirectH\x00'
    b'\x12A\n\x06oldest\x18\x04 \x01(\x0b2/.inference.ModelSequenceBatching.StrategyOldestH\x00\x12&\n'
    b'\x1emax_sequence_idle_microseconds\x18\x01 \x01(\x04\x12D\n\rcontrol_input\x18\x02 \x03(\x0b2-.in'
    b'ference.ModelSequenceBatching.ControlInput\x125\n\x05state\x18\x05 \x03(\x0b2&.inference.ModelSeq'
    b'uenceBatching.State\x12\x1a\n\x12iterative_sequence\x18\x06 \x01(\x08\x1a\xb1\x02\n\x07Control'
    b'\x12;\n\x04kind\x18\x01 \x01(\x0e2-.inference.ModelSequenceBatching.Control.Kind\x12\x18\n\x10int'
    b'32_false_true\x18\x02 \x03(\x05\x12\x17\n\x0ffp32_false_true\x18\x03 \x03(\x02\x12\x17\n\x0fbool_'
    b'false_true\x18\x05 \x03(\x08\x12&\n\tdata_type\x18\x04 \x01(\x0e2\x13.inference.DataType"u\n\x04K'
    b'ind\x12\x1a\n\x16CONTROL_SEQUENCE_START\x10\x00\x12\x1a\n\x16CONTROL_SEQUENCE_READY\x10\x01\x12'
    b'\x18\n\x14CONTROL_SEQUENCE_END\x10\x02\x12\x1b\n\x17CONTROL_SEQUENCE_CORRID\x10\x03\x1aW\n\x0cCon'
    b'trolInput\x12\x0c\n\x04name\x18\x01 \x01(\t\x129\n\x07control\x18\x02 \x03(\x0b2(.inference.Model'
    b'SequenceBatching.Control\x1a\x8a\x01\n\x0cInitialState\x12&\n\tdata_type\x18\x01 \x01(\x0e2\x13.i'
    b'nference.DataType\x12\x0c\n\x04dims\x18\x02 \x03(\x03\x12\x13\n\tzero_data\x18\x03 \x01(\x08H\x00'
    b'\x12\x13\n\tdata_file\x18\x04 \x01(\tH\x00\x12\x0c\n\x04name\x18\x05 \x01(\tB\x0c\n\nstate_data'
    b'\x1a\xf3\x01\n\x05State\x12\x12\n\ninput_name\x18\x01 \x01(\t\x12\x13\n\x0boutput_name\x18\x02 '
    b'\x01(\t\x12&\n\tdata_type\x18\x03 \x01(\x0e2\x13.inference.DataType\x12\x0c\n\x04dims\x18\x04 '
    b'\x03(\x03\x12D\n\rinitial_state\x18\x05 \x03(\x0b2-.inference.ModelSequenceBatching.InitialState'
    b'\x12(\n use_same_buffer_for_input_output\x18\x06 \x01(\x08\x12\x1b\n\x13use_growable_memory\x18'
    b'\x07 \x01(\x08\x1aX\n\x0eStrategyDirect\x12$\n\x1cmax_queue_delay_microseconds\x18\x01 \x01(\x04'
    b'\x12 \n\x18minimum_slot_utilization\x18\x02 \x01(\x02\x1a\x90\x01\n\x0eStrategyOldest\x12\x1f\n'
    b'\x17max_candidate_sequences\x18\x01 \x01(\x05\x12\x1c\n\x14preferred_batch_size\x18\x02 \x03(\x05'
    b'\x12$\n\x1cmax_queue_delay_microseconds\x18\x03 \x01(\x04\x12\x19\n\x11preserve_ordering\x18\x04 '
    b'\x01(\x08B\x11\n\x0fstrategy_choice"\x95\x03\n\x0fModelEnsembling\x12-\n\x04step\x18\x01 \x03('
    b'\x0b2\x1f.inference.ModelEnsembling.Step\x12\x1d\n\x15max_inflight_requests\x18\x02 \x01(\r\x1a'
    b'\xb3\x02\n\x04Step\x12\x12\n\nmodel_name\x18\x01 \x01(\t\x12\x15\n\rmodel_version\x18\x02 \x01('
    b'\x03\x12@\n\tinput_map\x18\x03 \x03(\x0b2-.inference.ModelEnsembling.Step.InputMapEntry\x12B\n\no'
    b'utput_map\x18\x04 \x03(\x0b2..inference.ModelEnsembling.Step.OutputMapEntry\x12\x17\n\x0fmodel_na'
    b'mespace\x18\x05 \x01(\t\x1a/\n\rInputMapEntry\x12\x0b\n\x03key\x18\x01 \x01(\t\x12\r\n\x05value'
    b'\x18\x02 \x01(\t:\x028\x01\x1a0\n\x0eOutputMapEntry\x12\x0b\n\x03key\x18\x01 \x01(\t\x12\r\n\x05v'
    b'alue\x18\x02 \x01(\t:\x028\x01"&\n\x0eModelParameter\x12\x14\n\x0cstring_value\x18\x01 \x01(\t"'
    b'\xd9\x02\n\x0bModelWarmup\x12\x0c\n\x04name\x18\x01 \x01(\t\x12\x12\n\nbatch_size\x18\x02 \x01(\r'
    b'\x122\n\x06inputs\x18\x03 \x03(\x0b2".inference.ModelWarmup.InputsEntry\x12\r\n\x05count\x18\x04 '
    b'\x01(\r\x1a\x97\x01\n\x05Input\x12&\n\tdata_type\x18\x01 \x01(\x0e2\x13.inference.DataType\x12'
    b'\x0c\n\x04dims\x18\x02 \x03(\x03\x12\x13\n\tzero_data\x18\x03 \x01(\x08H\x00\x12\x15\n\x0brandom_'
    b'data\x18\x04 \x01(\x08H\x00\x12\x19\n\x0finput_data_file\x18\x05 \x01(\tH\x00B\x11\n\x0finput_dat'
    b'a_type\x1aK\n\x0bInputsEntry\x12\x0b\n\x03key\x18\x01 \x01(\t\x12+\n\x05value\x18\x02 \x01(\x0b2'
    b'\x1c.inference.ModelWarmup.Input:\x028\x01".\n\x0fModelOperations\x12\x1b\n\x13op_library_filenam'
    b'e\x18\x01 \x03(\t"+\n\x16ModelTransactionPolicy\x12\x11\n\tdecoupled\x18\x01 \x01(\x08"\xe6\x01\n'
    b'\x15ModelRepositoryAgents\x126\n\x06agents\x18\x01 \x03(\x0b2&.inference.ModelRepositoryAgents.Ag'
    b'ent\x1a\x94\x01\n\x05Agent\x12\x0c\n\x04name\x18\x01 \x01(\t\x12J\n\nparameters\x18\x02 \x03(\x0b'
    b'26.inference.ModelRepositoryAgents.Agent.ParametersEntry\x1a1\n\x0fParametersEntry\x12\x0b\n\x03k'
    b'ey\x18\x01 \x01(\t\x12\r\n\x05value\x18\x02 \x01(\t:\x028\x01"$\n\x12ModelResponseCache\x12\x0e\n'
    b'\x06enable\x18\x01 \x01(\x08"\xe2\x02\n\x0cModelMetrics\x12=\n\x0emetric_control\x18\x01 \x03('
    b'\x0b2%.inference.ModelMetrics.MetricControl\x1a\x92\x02\n\rMetricControl\x12Q\n\x11metric_identif'
    b'ier\x18\x01 \x01(\x0b26.inference.ModelMetrics.MetricControl.MetricIdentifier\x12S\n\x11histogram'
    b'_options\x18\x02 \x01(\x0b26.inference.ModelMetrics.MetricControl.HistogramOptionsH\x00\x1a"\n'
    b'\x10MetricIdentifier\x12\x0e\n\x06family\x18\x01 \x01(\t\x1a#\n\x10HistogramOptions\x12\x0f\n\x07'
    b'buckets\x18\x01 \x03(\x01B\x10\n\x0emetric_options"\xf3\n\n\x0bModelConfig\x12\x0c\n\x04name\x18'
    b'\x01 \x01(\t\x12\x10\n\x08platform\x18\x02 \x01(\t\x12\x0f\n\x07backend\x18\x11 \x01(\t\x12\x0f\n'
    b'\x07runtime\x18\x19 \x01(\t\x125\n\x0eversion_policy\x18\x03 \x01(\x0b2\x1d.inference.ModelVersio'
    b'nPolicy\x12\x16\n\x0emax_batch_size\x18\x04 \x01(\x05\x12$\n\x05input\x18\x05 \x03(\x0b2\x15.infe'
    b'rence.ModelInput\x12&\n\x06output\x18\x06 \x03(\x0b2\x16.inference.ModelOutput\x12*\n\x0bbatch_in'
    b'put\x18\x14 \x03(\x0b2\x15.inference.BatchInput\x12,\n\x0cbatch_output\x18\x15 \x03(\x0b2\x16.inf'
    b'erence.BatchOutput\x128\n\x0coptimization\x18\x0c \x01(\x0b2".inference.ModelOptimizationPolicy'
    b'\x12;\n\x10dynamic_batching\x18\x0b \x01(\x0b2\x1f.inference.ModelDynamicBatchingH\x00\x12=\n\x11'
    b'sequence_batching\x18\r \x01(\x0b2 .inference.ModelSequenceBatchingH\x00\x129\n\x13ensemble_sched'
    b'uling\x18\x0f \x01(\x0b2\x1a.inference.ModelEnsemblingH\x00\x125\n\x0einstance_group\x18\x07 \x03'
    b'(\x0b2\x1d.inference.ModelInstanceGroup\x12\x1e\n\x16default_model_filename\x18\x08 \x01(\t\x12H'
    b'\n\x12cc_model_filenames\x18\t \x03(\x0b2,.inference.ModelConfig.CcModelFilenamesEntry\x12;\n\x0b'
    b'metric_tags\x18\n \x03(\x0b2&.inference.ModelConfig.MetricTagsEntry\x12:\n\nparameters\x18\x0e '
    b'\x03(\x0b2&.inference.ModelConfig.ParametersEntry\x12,\n\x0cmodel_warmup\x18\x10 \x03(\x0b2\x16.i'
    b'nference.ModelWarmup\x124\n\x10model_operations\x18\x12 \x01(\x0b2\x1a.inference.ModelOperations'
    b'\x12C\n\x18model_transaction_policy\x18\x13 \x01(\x0b2!.inference.ModelTransactionPolicy\x12A\n'
    b'\x17model_repository_agents\x18\x17 \x01(\x0b2 .inference.ModelRepositoryAgents\x125\n\x0erespons'
    b'e_cache\x18\x18 \x01(\x0b2\x1d.inference.ModelResponseCache\x12.\n\rmodel_metrics\x18\x1a \x01('
    b'\x0b2\x17.inference.ModelMetrics\x1a7\n\x15CcModelFilenamesEntry\x12\x0b\n\x03key\x18\x01 \x01(\t'
    b'\x12\r\n\x05value\x18\x02 \x01(\t:\x028\x01\x1a1\n\x0fMetricTagsEntry\x12\x0b\n\x03key\x18\x01 '
    b'\x01(\t\x12\r\n\x05value\x18\x02 \x01(\t:\x028\x01\x1aL\n\x0fParametersEntry\x12\x0b\n\x03key\x18'
    b'\x01 \x01(\t\x12(\n\x05value\x18\x02 \x01(\x0b2\x19.inference.ModelParameter:\x028\x01B\x13\n\x11'
    b'scheduling_choice*\xfa\x01\n\x08DataType\x12\x10\n\x0cTYPE_INVALID\x10\x00\x12\r\n\tTYPE_BOOL\x10'
    b'\x01\x12\x0e\n\nTYPE_UINT8\x10\x02\x12\x0f\n\x0bTYPE_UINT16\x10\x03\x12\x0f\n\x0bTYPE_UINT32\x10'
    b'\x04\x12\x0f\n\x0bTYPE_UINT64\x10\x05\x12\r\n\tTYPE_INT8\x10\x06\x12\x0e\n\nTYPE_INT16\x10\x07'
    b'\x12\x0e\n\nTYPE_INT32\x10\x08\x12\x0e\n\nTYPE_INT64\x10\t\x12\r\n\tTYPE_FP16\x10\n\x12\r\n\tTYPE'
    b'_FP32\x10\x0b\x12\r\n\tTYPE_FP64\x10\x0c\x12\x0f\n\x0bTYPE_STRING\x10\r\x12\r\n\tTYPE_BF16\x10'
    b'\x0eb\x06proto3'
)
